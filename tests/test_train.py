"""`minidiff train`: deterministic for a seed, resumable exactly (a run spread over sittings ends where an
uninterrupted one does), and it works: a model trained from scratch by minidiff's own gradients answers
its training prompts."""

import json
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from minidiff.errors import MinidiffError
from minidiff.train.trainer import Settings, train

PAIRS = {"pairs": [["What is the capital of France?", "Paris."], ["Name a prime number", "Seven is prime."]]}


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps(PAIRS))
    return p


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, data):
    s = Settings(steps=6, batch=2, warmup=2, save_every=100)
    train(None, data, tmp_path / "a", s)
    train(None, data, tmp_path / "b", s, stop_after=2)                 # three sittings: 2 + 3 + 1 steps
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 2
    train(None, data, tmp_path / "b", Settings(), resume=True, stop_after=3)
    res = train(None, data, tmp_path / "b", Settings(), resume=True)
    assert res["step"] == 6 and len(res["history"]) == 6
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    sa, sb = load_file(str(tmp_path / "a" / "trainer_state.safetensors")), load_file(str(tmp_path / "b" / "trainer_state.safetensors"))
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_resuming_with_other_data_is_refused_and_the_run_keeps_its_origin(tmp_path, data):
    """An exact resume needs the pairs the run trained on (compared by content: a copy elsewhere is fine); other
    pairs are one error and nothing is written. Resumed sittings keep recording where the run started."""
    train(None, data, tmp_path / "r", Settings(steps=4, batch=2, warmup=1), stop_after=2)
    before = (tmp_path / "r" / "trainer_state.json").read_text()
    other = tmp_path / "other.json"
    pairs = json.loads(data.read_text())["pairs"]
    other.write_text(json.dumps({"pairs": pairs[:-1] + [[pairs[-1][0], pairs[-1][1] + "!"]]}))
    with pytest.raises(MinidiffError, match="other pairs than this run trained on"):
        train(None, other, tmp_path / "r", Settings(), resume=True)
    assert (tmp_path / "r" / "trainer_state.json").read_text() == before
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(json.loads(data.read_text()), indent=3))        # same pairs, other bytes
    train(None, copy, tmp_path / "r", Settings(), resume=True)
    meta = json.loads((tmp_path / "r" / "trainer_state.json").read_text())
    assert meta["step"] == 4 and meta["source"] != str(tmp_path / "r") and not meta["from_scratch"]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, data):
    s = Settings(steps=2, batch=2, warmup=1)
    train(None, data, tmp_path / "a", s)
    train(None, data, tmp_path / "b", s)
    train(None, data, tmp_path / "c", Settings(steps=2, batch=2, warmup=1, seed=7))
    a, b, c = (weights(tmp_path / x) for x in "abc")
    k = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(a[k], b[k]) and not np.array_equal(a[k], c[k])


def test_trained_from_scratch_it_answers(tmp_path, data):
    out = tmp_path / "m"
    p = subprocess.run([sys.executable, "-m", "minidiff", "train", "--data", str(data), "--out", str(out),
                        "--from-scratch", "--steps", "300", "--batch", "4"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    hist = json.loads((out / "trainer_state.json").read_text())["history"]
    assert hist[-1][1] + hist[-1][2] < 0.1 * (hist[0][1] + hist[0][2])          # the loss fell tenfold
    for prompt, answer in PAIRS["pairs"]:
        p = subprocess.run([sys.executable, "-m", "minidiff", "generate", "--model", str(out), prompt, "--seed", "1",
                            "-q"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == answer, (prompt, p.stdout, p.stderr)


def test_cli_refusals(tmp_path, data):
    def run(*args):
        p = subprocess.run([sys.executable, "-m", "minidiff", "train", *args], capture_output=True, text=True, timeout=120)
        return p.returncode, p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"pairs": [["only a prompt"]]}')
    code, err = run("--data", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("minidiff: error:") and err.count("\n") == 1
    code, err = run("--data", str(data), "--out", str(tmp_path / "none"), "--resume")
    assert code == 2 and "no trainer_state.json" in err
    train(None, data, tmp_path / "done", Settings(steps=1, batch=1, warmup=1))
    code, err = run("--data", str(data), "--out", str(tmp_path / "done"))
    assert code == 2 and "--resume continues it" in err
    code, err = run("--data", str(data), "--out", str(tmp_path / "o"), "--lr", "nan")
    assert code == 2 and "--lr" in err


def test_pairs_may_be_gzipped_and_bad_or_oversized_files_are_one_error(tmp_path, data, monkeypatch):
    """A gzipped pairs file reads as the plain one (found by its bytes, not its name). A truncated or corrupt
    gzip, a directory, or JSON beyond the size cap (a small file that unzips to gigabytes) is one MinidiffError,
    and the cap is checked before decoding: the read stops one byte past it."""
    import gzip

    from minidiff.train import trainer
    raw = data.read_bytes()
    (tmp_path / "p.json.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "p.bin").write_bytes(gzip.compress(raw))
    plain = trainer.read_pairs(data)
    assert trainer.read_pairs(tmp_path / "p.json.gz") == plain == trainer.read_pairs(tmp_path / "p.bin")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-9])
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b" + bytes(range(40)))
    for bad, why in (("cut.gz", "cannot read"), ("junk.gz", "cannot read"), (".", "cannot read")):
        with pytest.raises(MinidiffError, match=why):
            trainer.read_pairs(tmp_path / bad)
    monkeypatch.setattr(trainer, "MAX_PAIRS_BYTES", len(raw) - 1)
    for name, why in ((data, "MiB of JSON$"), (tmp_path / "p.json.gz", "MiB of JSON unzipped")):
        with pytest.raises(MinidiffError, match=why):
            trainer.read_pairs(name)
    monkeypatch.setattr(trainer, "MAX_PAIRS_BYTES", len(raw))
    assert trainer.read_pairs(tmp_path / "p.json.gz") == plain
    bomb, z = tmp_path / "bomb.gz", zlib.compressobj(9, zlib.DEFLATED, 31)     # 31: the gzip container
    with open(bomb, "wb") as f:                          # 256 MiB of spaces in about 250 kB
        f.write(z.compress(raw))
        for _ in range(256):
            f.write(z.compress(b" " * (1 << 20)))
        f.write(z.flush())
    monkeypatch.setattr(trainer, "MAX_PAIRS_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(MinidiffError, match="MiB of JSON unzipped"):
            trainer.read_pairs(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak                          # read up to the cap, not the whole bomb


def test_adamw_and_schedule_equal_torch():
    """adamw_step (clipping + AdamW with bias correction, decoupled decay) against torch.optim.AdamW with
    clip_grad_norm_, and lr_at against the LambdaLR schedule the torch trainer of the first default model used."""
    torch = pytest.importorskip("torch")
    import math
    from minidiff.train.trainer import adamw_step, lr_at
    s = Settings(steps=10, lr=1e-2, warmup=3, weight_decay=0.1, clip=0.5)
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(tp.values(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, k / s.steps)))))
    state = {}
    for step in range(6):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        assert abs(lr_at(step, s) - sched.get_last_lr()[0]) < 1e-15
        adamw_step(np, params, grads, state, step, lr_at(step, s), s)
        for k, g in grads.items():
            tp[k].grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tp.values(), s.clip)
        opt.step()
        sched.step()
    for k in params:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_a_training_checkpoint_quantizes_and_loads(tmp_path, data):
    """trainer_state.safetensors beside model.safetensors is optimizer state, not weights: the loader and
    `minidiff quantize` read model.safetensors alone, and the quantized copy carries no trainer state."""
    import minidiff
    from minidiff.cli import main
    train(None, data, tmp_path / "run", Settings(steps=1, batch=1, warmup=1))
    assert (tmp_path / "run" / "trainer_state.safetensors").is_file()
    assert main(["quantize", str(tmp_path / "run"), str(tmp_path / "q"), "--format", "nvfp4"]) == 0
    assert not list((tmp_path / "q").glob("trainer_state*"))
    a, b = minidiff.load(str(tmp_path / "run")), minidiff.load(str(tmp_path / "q"))
    ids = np.array([2, 10, 11, 12])
    la, lb = a.denoise(ids, a.encode(ids)), b.denoise(ids, b.encode(ids))
    assert np.isfinite(lb).all() and np.abs(la - lb).max() < 0.5 * np.abs(la).max()


def test_progress_eta_of_a_resumed_sitting(monkeypatch):
    """The ETA is this sitting's pace times the steps left: a sitting resumed at step 300 of 400 that took
    10 s for its first 10 steps has 90 s to go (not the 30 s that dividing by the run's step 310 gives)."""
    import io

    from minidiff.train import trainer
    clock = iter(float(t) for t in range(11))            # the sitting starts at 0, then one step a second
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = trainer.Progress(out)
    for step in range(301, 311):
        p(step, 400, 0.5, 0.5, 100.0, 1e-3, 1.0)
    assert out.getvalue().splitlines()[-1].endswith("ETA 1m30s"), out.getvalue()


def test_device_cuda_without_a_gpu_is_one_error(tmp_path, data):
    """`--device cuda` where CuPy or a GPU is missing: one line, exit 2, nothing written."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: tests/test_gpu_train.py trains on it")
    except Exception:
        pass
    p = subprocess.run([sys.executable, "-m", "minidiff", "train", "--data", str(data), "--out", str(tmp_path / "o"),
                        "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("minidiff: error: device 'cuda'") and p.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_sitting_ended_by_the_clock_resumes_exactly(tmp_path, data, monkeypatch):
    """--stop-after-minutes ends a sitting at the first step that finishes after the time, with a
    checkpoint; resuming gives the bits of a run that never stopped."""
    from minidiff.train import trainer
    s = Settings(steps=6, batch=2, warmup=2, save_every=100)
    train(None, data, tmp_path / "a", s)
    clock = iter(range(1000))                          # each call of the clock: one more second
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: float(next(clock)))
    res = train(None, data, tmp_path / "b", s, stop_after_seconds=2.5)
    assert res["step"] == 3 and json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 3
    monkeypatch.undo()
    train(None, data, tmp_path / "b", Settings(), resume=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    p = subprocess.run([sys.executable, "-m", "minidiff", "train", "--data", str(data), "--out", str(tmp_path / "c"),
                        "--stop-after-minutes", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--stop-after-minutes must be > 0" in p.stderr
