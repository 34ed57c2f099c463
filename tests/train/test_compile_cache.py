"""Compile artifacts carried between machines (binarydm.train._compile_cache): a graph
compiled by inductor in one process, saved as a file, is served from that file to a fresh
process with an empty inductor cache (a cache hit, the same output); unreadable files are
skipped and cost nothing but their warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from binarydm.train._compile_cache import SUFFIX, cache_folder, load_compile_cache

# One small graph, compiled by inductor on the CPU (one C++ kernel: seconds, not minutes).
_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from binarydm.train._compile_cache import load_compile_cache, save_compile_cache

    folder, action = sys.argv[1], sys.argv[2]
    out = {"loaded": load_compile_cache(folder) if action == "load" else None}
    fn = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum(dim=1), backend="inductor")
    out["y"] = fn(torch.arange(12.0).reshape(3, 4)).tolist()
    out["fx"] = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
    saved = [save_compile_cache(folder), save_compile_cache(folder)]
    out["saved"] = [str(path) if path else None for path in saved]
    print("RESULT " + json.dumps(out))
    """
)


def _process(folder, action: str, inductor_cache) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    completed = subprocess.run(
        [sys.executable, "-c", _PROCESS, str(folder), action],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_a_saved_graph_is_a_cache_hit_in_a_fresh_process(tmp_path):
    folder = cache_folder(tmp_path / "binarydm-cache")
    first = _process(folder, "save", tmp_path / "inductor-a")
    assert first["fx"] == {"fxgraph_cache_miss": 1}  # compiled from nothing
    saved, again = first["saved"]
    assert saved is not None and saved.endswith(SUFFIX) and again is None  # one file per keys
    assert [p.name for p in folder.iterdir()] == [os.path.basename(saved)]  # no partial left

    # Another machine: an empty inductor cache, the folder carried over.
    second = _process(folder, "load", tmp_path / "inductor-b")
    assert second["loaded"]["files"] == 1 and second["loaded"]["entries"] >= 1
    assert second["loaded"]["skipped"] == 0
    assert second["fx"] == {"fxgraph_cache_hit": 1}  # served from the file, not compiled
    x = torch.arange(12.0).reshape(3, 4)
    expected = (x.sin() * 2 + x.cos()).sum(dim=1)
    assert torch.allclose(torch.tensor(second["y"]), expected, atol=1e-5)
    assert second["y"] == first["y"]
    # Its keys were all in the folder already: nothing new is written.
    assert second["saved"] == [None, None]
    assert len(list(folder.iterdir())) == 1


def test_unreadable_files_are_skipped(tmp_path, caplog):
    folder = tmp_path / "compile"
    folder.mkdir()
    (folder / f"truncated{SUFFIX}").write_bytes(b"\x80\x04not a cache artifact")
    (folder / "notes.txt").write_text("not an artifact file: not read")
    loaded = load_compile_cache(folder)
    assert loaded["files"] == 0 and loaded["skipped"] == 1 and loaded["entries"] == 0
    assert "truncated" in caplog.text and "skipped" in caplog.text
    assert load_compile_cache(tmp_path / "absent")["files"] == 0  # nothing saved yet
