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

from binarydm.train._compile_cache import (
    MAX_MIB_ENV,
    SUFFIX,
    cache_folder,
    evict_least_recent,
    load_compile_cache,
    max_folder_bytes,
)

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


def _run(source: str, inductor_cache, *args, env: dict | None = None) -> dict:
    """``source`` in a fresh Python with its own inductor cache; its ``RESULT`` line."""
    env = {**os.environ, **(env or {}), "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    completed = subprocess.run(
        [sys.executable, "-c", source, *map(str, args)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_a_saved_graph_is_a_cache_hit_in_a_fresh_process(tmp_path):
    folder = cache_folder(tmp_path / "binarydm-cache")
    first = _run(_PROCESS, tmp_path / "inductor-a", folder, "save")
    assert first["fx"] == {"fxgraph_cache_miss": 1}  # compiled from nothing
    saved, again = first["saved"]
    assert saved is not None and saved.endswith(SUFFIX) and again is None  # one file per keys
    assert [p.name for p in folder.iterdir()] == [os.path.basename(saved)]  # no partial left
    assert os.stat(saved).st_mode & 0o777 == 0o644  # readable by a shared folder's users

    # Another machine: an empty inductor cache, the folder carried over (copied, with an
    # old time stamp: loading it marks it used, so a size bound removes it last).
    os.utime(saved, (1_000_000, 1_000_000))
    second = _run(_PROCESS, tmp_path / "inductor-b", folder, "load")
    assert os.stat(saved).st_mtime > 1_000_000
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


_GRAPHS = (
    "lambda v: v.sin().sum(dim=1)",  # the first compiled step's
    "lambda v: (v * 3).cos().mean(dim=0)",  # a later stage's
)

_TWICE = textwrap.dedent(
    f"""
    import json, sys, types
    import torch
    from binarydm.train import _loop

    run = types.SimpleNamespace(
        job=types.SimpleNamespace(
            settings=types.SimpleNamespace(training=types.SimpleNamespace(compile_cache=True)),
            cache_dir=sys.argv[1],
        ),
        session=types.SimpleNamespace(rank=0),
    )
    x = torch.arange(12.0).reshape(3, 4)
    torch.compile({_GRAPHS[0]}, backend="inductor")(x)
    _loop._save_compile_cache(run)  # after the first compiled step
    torch.compile({_GRAPHS[1]}, backend="inductor")(x)
    _loop._save_compile_cache(run)  # after the last step
    # A folder that cannot be written (here a file in its place): reported, not raised.
    from binarydm.train._compile_cache import save_compile_cache
    torch.compile(lambda v: v.tanh().sum(), backend="inductor")(x)
    blocked = sys.argv[1] + "/blocked"
    open(blocked, "w").close()
    print("RESULT " + json.dumps({{"blocked": save_compile_cache(blocked + "/compile")}}))
    """
)

_BOTH_FROM_FOLDER = textwrap.dedent(
    f"""
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from binarydm.train._compile_cache import load_compile_cache

    loaded = load_compile_cache(sys.argv[1])
    x = torch.arange(12.0).reshape(3, 4)
    for graph in ({_GRAPHS[0]}, {_GRAPHS[1]}):
        torch.compile(graph, backend="inductor")(x)
    fx = {{k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}}
    print("RESULT " + json.dumps({{"loaded": loaded, "fx": fx}}))
    """
)


def test_the_loop_saves_after_its_first_compiled_step_and_again_with_later_graphs(tmp_path):
    """``_loop._save_compile_cache`` as the training loop calls it: after the first
    compiled step, then after the last with a later stage's graph compiled. Each file
    holds what came after the save before it; a fresh process with empty caches, given
    the folder, compiles neither graph, and given only the later file, the first graph
    again. A save into a folder that cannot be made returns None without raising."""
    result = _run(_TWICE, tmp_path / "inductor", tmp_path / "cache")
    assert result["blocked"] is None
    folder = cache_folder(tmp_path / "cache")
    files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2 and all(p.suffix == SUFFIX for p in files)  # no partial left
    result = _run(_BOTH_FROM_FOLDER, tmp_path / "inductor-fresh", folder)
    assert result["loaded"]["files"] == 2 and result["loaded"]["skipped"] == 0
    assert result["fx"] == {"fxgraph_cache_hit": 2}  # both served, nothing compiled
    sizes = [p.stat().st_size for p in files]
    assert sizes[1] < 1.5 * sizes[0]  # the later file: not both graphs' bytes
    files[0].unlink()  # the first step's file gone: only the later graph is served
    result = _run(_BOTH_FROM_FOLDER, tmp_path / "inductor-fresh-2", folder)
    assert result["fx"] == {"fxgraph_cache_miss": 1, "fxgraph_cache_hit": 1}


def _artifact_files(folder, ages_and_sizes):
    """Files named by age order, each ``size`` bytes, last used ``age`` seconds ago."""
    folder.mkdir(parents=True, exist_ok=True)
    now = 2_000_000_000
    paths = []
    for index, (age, size) in enumerate(ages_and_sizes):
        path = folder / f"f{index}{SUFFIX}"
        path.write_bytes(b"\0" * size)
        os.utime(path, (now - age, now - age))
        paths.append(path)
    return paths


def test_the_folder_is_bounded_by_removing_the_least_recently_used_files(tmp_path):
    old, middle, recent, new = _artifact_files(
        tmp_path, [(300, 4000), (200, 3000), (100, 2000), (0, 5000)]
    )
    (tmp_path / "notes.txt").write_bytes(b"\0" * 10_000)  # not an artifact: not counted
    assert evict_least_recent(tmp_path, 8000, keep=new) == [old, middle]  # 14000 -> 7000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f2.megacache", "f3.megacache",
                                                          "notes.txt"]  # fmt: skip
    # The file just written stays even when it alone is over the bound.
    assert evict_least_recent(tmp_path, 1000, keep=new) == [recent]
    assert new.is_file() and evict_least_recent(tmp_path, 1000, keep=new) == []


def test_the_bound_comes_from_the_environment_and_bad_values_say_so(monkeypatch, caplog):
    monkeypatch.delenv(MAX_MIB_ENV, raising=False)
    assert max_folder_bytes() == 4096 * 2**20
    monkeypatch.setenv(MAX_MIB_ENV, "0.5")
    assert max_folder_bytes() == 2**19
    for bad in ("lots", "-1", "nan", "inf"):
        monkeypatch.setenv(MAX_MIB_ENV, bad)
        assert max_folder_bytes() == 4096 * 2**20
        assert f"{MAX_MIB_ENV}={bad!r} is not a finite number of MiB" in caplog.text


def test_a_save_past_the_bound_removes_older_files_and_keeps_its_own(tmp_path):
    folder = cache_folder(tmp_path / "cache")
    (stale,) = _artifact_files(folder, [(10_000, 2**20)])  # a MiB of someone's old graphs
    result = _run(_PROCESS, tmp_path / "inductor", folder, "save", env={MAX_MIB_ENV: "0.5"})
    saved = result["saved"][0]
    assert saved is not None and not stale.exists()
    assert [p.name for p in folder.iterdir()] == [os.path.basename(saved)]
