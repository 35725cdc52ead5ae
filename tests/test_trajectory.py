"""`minidiff generate --trajectory`: the file alone replays the generation.

`replay` below is a second implementation of the sampler's decisions (docs/sampler.md, docs/randomness.md)
that reads nothing but the trajectory file: it regenerates every random draw with the NumPy-free generator
from the recorded seed, and from the recorded logits re-derives each step's samples, entropies, accepted
positions, next canvas, adaptive stop and commit. Any field minidiff recorded wrongly, or any rule the
two implementations disagree on, fails here.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from minidiff.portable_rng import PCG64


def replay(path):
    """Check a B = 1 trajectory against the rules, using only the file. Returns the generated tokens."""
    with safe_open(str(path), "np") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["generation_config"])
    V, C = int(meta["vocab_size"]), int(meta["canvas_length"])
    rng = PCG64(int(meta["seed"]))
    s, history, out = 0, [], []
    for k, n_steps in enumerate(t["canvases.steps"]):
        assert t["canvases.init"][k, 0].tolist() == rng.integers(V, C)            # draw: the canvas
        canvas, history = t["canvases.init"][k, 0], []
        for i in range(n_steps):
            assert t["steps.canvas_index"][s] == k and t["steps.step"][s] == i
            assert (t["steps.canvas"][s, 0] == canvas).all()                       # input = last step's output
            u, noise = rng.random(C), rng.integers(V, C)                           # draws: u, then noise
            assert t["steps.u"][s, 0].tolist() == u and t["steps.noise"][s, 0].tolist() == noise
            z = t["steps.logits"][s, 0]                                            # [C, V] tempered logits
            e = np.exp(z - z.max(-1, keepdims=True))
            p = e / e.sum(-1, keepdims=True)
            H = -(p * np.log(np.maximum(p, 1e-45))).sum(-1)
            np.testing.assert_allclose(t["steps.entropy"][s, 0], H, atol=1e-5)
            cdf = np.cumsum(p.astype(np.float64), -1)
            sampled = np.minimum((cdf <= (np.array(u) * cdf[:, -1])[:, None]).sum(-1), V - 1)
            assert (t["steps.sampled"][s, 0] == sampled).all()
            H = t["steps.entropy"][s, 0]                                           # the recorded float32 values
            order = np.argsort(H, kind="stable")
            excl = np.cumsum(H[order].astype(np.float64)).astype(np.float32) - H[order]
            accepted = np.zeros(C, bool)
            accepted[order] = excl <= np.float32(cfg["entropy_bound"])
            assert (t["steps.accepted"][s, 0] == accepted).all()
            canvas = np.where(accepted, sampled, noise)
            assert (t["steps.next_canvas"][s, 0] == canvas).all()
            argmax = z.argmax(-1)
            assert (t["steps.argmax"][s, 0] == argmax).all()
            stop = (cfg["stability_threshold"] is not None and len(history) >= cfg["stability_threshold"]
                    and all((h == argmax).all() for h in history[len(history) - cfg["stability_threshold"]:])
                    and H.mean() < np.float32(cfg["confidence_threshold"]))
            assert bool(t["steps.done"][s, 0]) == bool(stop)
            history.append(argmax)
            s += 1
            if stop:
                break
        assert i == n_steps - 1                                                    # stopped where minidiff did
        committed = argmax.copy()
        stops = np.isin(committed, cfg["eos_token_id"])
        if stops.any():
            committed[np.argmax(stops) + 1:] = cfg["pad_token_id"]
        assert (t["canvases.committed"][k, 0] == committed).all()
        out.append(committed)
        if stops.any():
            break
    assert s == len(t["steps.step"]) and k == len(t["canvases.steps"]) - 1
    return np.concatenate(out)


@pytest.mark.parametrize("args", [
    ["Write a haiku about the sea", "--seed", "3"],                          # memorised: stops early, ends at <turn|>
    ["Explain how a refrigerator works", "--seed", "11", "--steps", "9", "--max-new-tokens", "64"],
    ["--raw", "abc def", "--seed", "5", "--no-early-stop", "--steps", "4", "--max-new-tokens", "64"],
])
def test_trajectory_replays_from_the_file_alone(tmp_path, args):
    path = tmp_path / "t.safetensors"
    p = subprocess.run([sys.executable, "-m", "minidiff", "generate", *args, "--trajectory", str(path),
                        "--trajectory-logits"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    tokens = replay(path)
    with safe_open(str(path), "np") as f:
        assert f.metadata()["schema"] == "minidiff-trajectory"
        assert f.get_tensor("steps.step").size >= 2

    import minidiff                                    # the same tokens as the API with that seed
    from minidiff.generation_config import GenerationConfig
    with safe_open(str(path), "np") as f:
        prompt = f.get_tensor("prompt_ids")[0]
        cfg = GenerationConfig(**json.loads(f.metadata()["generation_config"]))
    res = minidiff.load(None).generate(prompt, config=cfg)
    n = len(tokens)
    assert (res.tokens[0][:n] == tokens).all()


def test_trajectory_without_logits_and_bad_use(tmp_path):
    path = tmp_path / "t.safetensors"
    p = subprocess.run([sys.executable, "-m", "minidiff", "generate", "hello", "--seed", "1", "--trajectory",
                        str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with safe_open(str(path), "np") as f:
        assert "steps.logits" not in f.keys() and "steps.u" in f.keys()
        assert f.get_tensor("steps.u").dtype == np.float64
    p = subprocess.run([sys.executable, "-m", "minidiff", "generate", "hello", "--trajectory-logits"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("minidiff: error: --trajectory-logits needs")
    p = subprocess.run([sys.executable, "-m", "minidiff", "generate", "hello", "--trajectory", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "is a folder" in p.stderr
