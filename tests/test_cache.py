"""The on-disk caches under crashes and concurrency: damaged entries rebuilt with a warning,
one valid file when processes build the same table at once, keys that cannot go stale."""

import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch

import windquant_gym as wq
from windquant_gym.cache import listing as listing_module
from windquant_gym.cache import storage as cache_module
from windquant_gym import problem as problem_module
from windquant_gym.cli import main as cli_main
from windquant_gym.errors import CacheWarning, ConfigError
from windquant_gym.quant import build as build_module
from windquant_gym.quant import code_version as code_version_module
from windquant_gym.quant.build import build_table, table_fingerprint

CONFIG = wq.QuantConfig(chunk_size=48, compensation="none", error_metric="activation")


def _scales(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    units = wq.find_units(model, CONFIG.chunk_size)
    return {u.module: torch.rand(model.get_submodule(u.module).weight.shape[1], generator=generator) + 0.5 for u in units}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _only_file(folder: Path, suffix: str = ".safetensors") -> Path:
    files = [p for p in folder.iterdir() if p.suffix == suffix]
    assert len(files) == 1, files
    return files[0]


# ----- the cache is isolated in tests -----------------------------------------------------------
def test_tests_use_their_own_cache_folder(tmp_path_factory):
    from windquant_gym.paths import cache_dir

    assert Path(cache_dir()).is_relative_to(tmp_path_factory.getbasetemp())
    assert not str(cache_dir()).startswith(str(Path.home() / ".cache"))


# ----- damaged entries ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "other format"])
def test_a_damaged_table_is_rebuilt_with_a_warning_naming_it(tiny, tmp_path, damage):
    model, _ = tiny
    scales = _scales(model)
    first = build_table(model, scales, CONFIG, cache=tmp_path, progress=False)
    # the table is memory-mapped from its file, which the damage below rewrites in place (the
    # cache itself only ever replaces files): keep what it held in memory of our own
    first_codes = {name: codes.clone() for name, codes in first.codes.items()}
    first_errors, first_fingerprint = first.fit_error_act.copy(), first.fingerprint
    del first
    path = _only_file(tmp_path)
    if damage == "truncated":
        _truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid safetensors file that is not a table of this key
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, str(path), metadata={"format": "1"})
    with pytest.warns(CacheWarning, match=str(path.name)):
        rebuilt = build_table(model, scales, CONFIG, cache=tmp_path, progress=False)
    assert rebuilt.fingerprint == first_fingerprint
    for name in first_codes:
        assert torch.equal(rebuilt.codes[name], first_codes[name])
    # the rebuilt file replaced the damaged one, and reads back without a warning
    assert _only_file(tmp_path) == path
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        again = build_table(model, scales, CONFIG, cache=tmp_path, progress=False)
    assert (again.fit_error_act == first_errors).all() and again.fingerprint == rebuilt.fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_truncated_calibration_is_rebuilt_with_a_warning(tiny, tmp_path):
    model, _ = tiny
    units = wq.find_units(model, 48)
    blocks = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    first = problem_module._cached_calibration(model, units, blocks, 2, tmp_path, False)
    path = _only_file(tmp_path)
    _truncate(path, 0.3)
    with pytest.warns(CacheWarning, match=f"calibration cache file .*{path.name}.*rebuilding"):
        second = problem_module._cached_calibration(model, units, blocks, 2, tmp_path, False)
    assert second.nll == first.nll
    for name in first.act_scales:
        assert torch.equal(second.act_scales[name], first.act_scales[name])
    assert _only_file(tmp_path) == path


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path):
    target = tmp_path / "entry.bin"
    with pytest.raises(RuntimeError, match="disk full"):
        with cache_module.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    # two writers never share a temporary name
    assert cache_module.temporary_path(target) != cache_module.temporary_path(target)


# ----- two processes, one table ------------------------------------------------------------------
def _build_in_child(folder: str, queue) -> None:
    import time

    torch.set_num_threads(1)
    fit_all = build_module._fit_all

    def slow_fit(*args, **kwargs):  # long enough that both processes want the table at once
        with open(Path(folder) / "fits.log", "a") as log:
            log.write("fit\n")
        time.sleep(3)
        return fit_all(*args, **kwargs)

    build_module._fit_all = slow_fit
    model, _ = wq.load_model("tiny-llama")
    table = build_table(model, _scales(model), CONFIG, cache=folder, progress=False)
    queue.put(table.fingerprint)


def test_two_processes_building_the_same_table_both_succeed_and_leave_one_valid_file(tiny, tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    assert [child.exitcode for child in children] == [0, 0]
    fingerprints = {queue.get(timeout=5) for _ in children}
    assert len(fingerprints) == 1
    assert (tmp_path / "fits.log").read_text() == "fit\n"  # one built it, the other waited and read it
    path = _only_file(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "fits.log").unlink()
    model, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # valid: read back without a rebuild
        table = build_table(model, _scales(model), CONFIG, cache=tmp_path, progress=False)
    assert table.fingerprint == fingerprints.pop() == path.stem


# ----- keys that cannot go stale -----------------------------------------------------------------
def test_the_table_key_changes_with_the_fitting_code(tiny, monkeypatch, tmp_path):
    model, _ = tiny
    units = wq.find_units(model, CONFIG.chunk_size)
    scales = _scales(model)
    before = table_fingerprint(model, units, scales, CONFIG)
    monkeypatch.setattr(code_version_module, "fitting_code_version", lambda: "edited")
    assert table_fingerprint(model, units, scales, CONFIG) != before
    # the version hashes the quant package's source, so an edit to any of its files changes it
    names = {p.name for p in code_version_module.fitting_sources()}
    assert {"quantizers.py", "compensation.py", "fitting.py", "accounting.py", "config.py", "build.py"} <= names
    copies = []
    for source in code_version_module.fitting_sources():
        copies.append(tmp_path / source.name)
        copies[-1].write_bytes(source.read_bytes())
    original = cache_module.source_version(copies)
    assert original == cache_module.source_version(code_version_module.fitting_sources())
    quantizers = tmp_path / "quantizers.py"
    quantizers.write_text(quantizers.read_text() + "\n# an edit\n")
    assert cache_module.source_version(copies) != original


@pytest.mark.parametrize("weight", ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"])
def test_the_calibration_key_covers_embeddings_and_norms(tiny, weight):
    model, _ = tiny
    units = wq.find_units(model, 48)
    blocks = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    before = problem_module.calibration_key(model, units, blocks)
    parameter = dict(model.named_parameters())[weight]
    saved = parameter.detach().clone()
    try:
        with torch.no_grad():
            parameter.mul_(1.01)
        assert problem_module.calibration_key(model, units, blocks) != before
    finally:
        with torch.no_grad():
            parameter.copy_(saved)
    assert problem_module.calibration_key(model, units, blocks) == before


# ----- windquant cache list / clear ---------------------------------------------------------------
def test_cache_cli_lists_and_clears(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WINDQUANT_MODEL_CACHE", str(tmp_path / "models"))
    model, tokenizer = tiny
    wq.QuantProblem.build(model, tokenizer, "wiki-sample", CONFIG, n_samples=2, seq_len=16, progress=False)
    stray = tmp_path / "cache" / "tables" / ".abc.safetensors.999999999-deadbeef.tmp"  # what a killed writer leaves
    stray.write_bytes(b"x" * 10)
    live = tmp_path / "cache" / "tables" / f".def.safetensors.{os.getpid()}-cafef00d.tmp"  # a writer still running
    live.write_bytes(b"y" * 10)
    assert cli_main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "calibration" in listing and "32 tokens" in listing
    assert "LlamaForCausalLM" in listing and "chunk_size=48, compensation=none" in listing
    assert "temporary (left by an interrupted write)" in listing
    assert "temporary (being written by a running process)" in listing
    assert "4 entries" in listing
    assert cli_main(["cache", "clear", "--stale"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and not stray.exists() and live.exists()
    from filelock import FileLock

    held = FileLock(str(tmp_path / "cache" / "tables" / "busy.safetensors.lock"))
    held.acquire()  # a build in progress: its lock stays
    free = tmp_path / "cache" / "tables" / "idle.safetensors.lock"
    free.write_text("")
    assert cli_main(["cache", "clear", "tables"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert (tmp_path / "cache" / "tables" / "busy.safetensors.lock").exists() and not free.exists() and live.exists()
    held.release()
    live.unlink()
    assert [e.kind for e in listing_module.cache_entries()] == ["calibration"]
    assert cli_main(["cache", "clear"]) == 0
    assert listing_module.cache_entries() == []
    with pytest.raises(ConfigError, match=r"Unknown cache kind\(s\) \['bogus'\]; choose from"):
        listing_module.cache_entries(["bogus"])


def test_a_stale_entry_is_listed_as_stale(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    build_table(model, _scales(model), CONFIG, cache=tmp_path / "tables", progress=False)
    monkeypatch.setattr(code_version_module, "fitting_code_version", lambda: "edited")
    [entry] = listing_module.cache_entries(["tables"], root=tmp_path)
    assert entry.detail.startswith("stale")
    assert listing_module.clear_cache(["tables"], root=tmp_path, stale_only=True) == [entry]
    assert not os.listdir(tmp_path / "tables")
