"""Writing a LoRA file (issue 31): a save killed mid-write leaves only the earlier file once the
next save or the start-up clean-up has run, only the pack's own temporary files are removed, a
full disk reads in the pack's words (from an OSError or from safetensors' own SafetensorError),
and a LoRA file's header tells its layout and rank without reading a tensor."""
import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch

import siso_ops.lora as lora_mod
import siso_ops.weights as weights

from .conftest import REPO


def _lora(value: float, rank: int = 4, width: int = 64) -> dict:
    return {"diffusion_model.x.lora_up.weight": torch.full((width, rank), value),
            "diffusion_model.x.lora_down.weight": torch.full((rank, width), value),
            "diffusion_model.x.alpha": torch.tensor(float(rank))}


def _pack_temporaries(folder) -> list:
    return sorted(n for n in os.listdir(folder) if weights.TEMPORARY.fullmatch(n))


# A child that saves a large LoRA over an earlier file and stops just before the file is complete
# (its data written, not yet flushed and renamed): the parent kills it there with SIGKILL.
CHILD = textwrap.dedent("""
    import os, sys, time, importlib.util
    spec = importlib.util.spec_from_file_location("siso_ops", os.path.join({repo!r}, "siso_ops", "__init__.py"),
                                                  submodule_search_locations=[os.path.join({repo!r}, "siso_ops")])
    module = importlib.util.module_from_spec(spec); sys.modules["siso_ops"] = module; spec.loader.exec_module(module)
    import torch
    import siso_ops.lora as lora
    def stop_here(fd):
        print("writing", flush=True)
        time.sleep(600)
    os.fsync = stop_here
    tensors = {{"diffusion_model.x.lora_up.weight": torch.full((2048, 128), 9.0),
               "diffusion_model.x.lora_down.weight": torch.full((128, 2048), 9.0),
               "diffusion_model.x.alpha": torch.tensor(128.0)}}
    lora.write_lora_file(tensors, sys.argv[1], {{}})
""")


def kill_mid_write(path) -> str:
    """Runs CHILD saving to ``path`` and kills it mid-write; returns the temporary file it left."""
    folder = os.path.dirname(path)
    before = set(os.listdir(folder))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "writing", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    left = sorted(set(os.listdir(folder)) - before)
    assert len(left) == 1 and weights.TEMPORARY.fullmatch(left[0]), left
    assert os.path.getsize(os.path.join(folder, left[0])) > 2048 * 128 * 4   # the data was written
    age(os.path.join(folder, left[0]))
    return left[0]


def age(path, seconds=None):
    """As if the file had last changed ``seconds`` ago (default: past weights.STALE_AFTER_S): a save
    killed earlier, not one another container is writing now."""
    seconds = weights.STALE_AFTER_S + 60 if seconds is None else seconds
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_save_killed_mid_write_is_cleaned_up_at_start_up_and_only_the_packs_files_go(tmp_path):
    path = tmp_path / "subject.safetensors"
    lora_mod.write_lora_file(_lora(0.5), str(path), {"siso.rank": "4"})
    before = path.read_bytes()
    kill_mid_write(path)
    assert path.read_bytes() == before           # the earlier file is intact while the litter is there
    others = [".tmpab12cd", "notes.tmp", ".other.safetensors.tmp", ".subject.safetensors.partial"]
    for name in others:                          # safetensors' own, a user's: not the pack's pattern
        (tmp_path / name).write_bytes(b"keep me")
    removed = weights.remove_stale_temporaries(str(tmp_path))   # what start-up runs on each loras folder
    assert len(removed) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["subject.safetensors"])
    assert path.read_bytes() == before
    assert set(safetensors.torch.load_file(str(path))) == set(_lora(0.5))


def test_the_next_save_into_the_folder_removes_what_a_killed_save_left(tmp_path):
    path = tmp_path / "subject.safetensors"
    lora_mod.write_lora_file(_lora(0.5), str(path), {})
    kill_mid_write(path)
    # tempfile.mkstemp's name for another tool writing into the folder: not the pack's, kept however old
    other_tool = tmp_path / ".subject.safetensors.k3x_9abc.tmp"
    other_tool.write_bytes(b"")
    age(other_tool)
    lora_mod.write_lora_file(_lora(0.25), str(tmp_path / "another.safetensors"), {})
    assert sorted(os.listdir(tmp_path)) == [other_tool.name, "another.safetensors", "subject.safetensors"]
    assert float(safetensors.torch.load_file(str(path))["diffusion_model.x.alpha"]) == 4.0


def test_a_temporary_file_of_a_save_still_running_elsewhere_is_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".subject.safetensors.{sleeper.pid}-abcd1234.tmp"
        live.write_bytes(b"being written")
        dead = _dead_pid()
        gone = tmp_path / f".subject.safetensors.{dead}-abcd1234.tmp"
        gone.write_bytes(b"left by a killed save")
        age(gone)
        # a process id not running here, changed a moment ago: a save of another container or machine
        # sharing the folder, whose ids are not this one's
        elsewhere = tmp_path / f".other.safetensors.{dead}-efgh5678.tmp"
        elsewhere.write_bytes(b"being written in another container")
        age(elsewhere, 5)
        assert weights.remove_stale_temporaries(str(tmp_path)) == [gone.name]
        assert live.exists() and elsewhere.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_no_second_temporary_file_is_written(tmp_path, monkeypatch):
    """safetensors' save_file writes its own hidden temporary file (the 983 MB litter of a crash):
    the pack serialises in memory and writes one file of its own pattern."""
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: pytest.fail("save_file used"))
    created = []
    real_mkstemp = weights.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        created.append(real_mkstemp(*args, **kwargs))
        return created[-1]
    monkeypatch.setattr(weights.tempfile, "mkstemp", mkstemp)
    lora_mod.write_lora_file(_lora(0.5), str(tmp_path / "one.safetensors"), {"siso.rank": "4"})
    assert len(created) == 1 and weights.TEMPORARY.fullmatch(os.path.basename(created[0][1]))
    assert os.listdir(tmp_path) == ["one.safetensors"]
    assert safetensors.safe_open(str(tmp_path / "one.safetensors"), "pt").metadata() == {"siso.rank": "4"}


# ----------------------------------------------------------------------------- a full disk
def _refused(tmp_path, monkeypatch, fail) -> str:
    path = tmp_path / "full.safetensors"
    lora_mod.write_lora_file(_lora(0.5), str(path), {})
    before = path.read_bytes()
    fail(monkeypatch)
    with pytest.raises(OSError) as refused:
        lora_mod.write_lora_file(_lora(9.0), str(path), {})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["full.safetensors"]
    return str(refused.value)


SIZE = len(safetensors.torch.save(_lora(9.0)))
UNITS = {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def _check_full_disk_message(message, tmp_path):
    assert message.startswith(f"could not write 'full.safetensors' in {tmp_path}: the disk is full"), message
    needs = re.search(r"The file needs ([\d,.]+) (bytes|KB|MB|GB)", message)
    assert needs, message   # the size the file takes (estimated where serialising itself failed)
    assert abs(float(needs.group(1).replace(",", "")) * UNITS[needs.group(2)] - SIZE) <= 0.05 * SIZE + 1000, message
    assert "are free there: free at least" in message and f"on the disk that holds {tmp_path}" in message, message
    assert "delete LoRAs or other files you no longer use there" in message, message
    assert "an earlier file of that name is unchanged" in message and "os error" not in message, message


def test_a_full_disk_from_safetensors_reads_in_the_packs_words(tmp_path, monkeypatch):
    """safetensors raises SafetensorError (not an OSError) for a full disk; the installed class."""
    assert weights.SafetensorError is not None and not issubclass(weights.SafetensorError, OSError)

    def safetensors_full(monkeypatch):
        def save(tensors, metadata=None):
            raise weights.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save", save)
    _check_full_disk_message(_refused(tmp_path, monkeypatch, safetensors_full), tmp_path)


def test_a_full_disk_while_writing_reads_in_the_packs_words(tmp_path, monkeypatch):
    def disk_full(monkeypatch):
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(weights.os, "fsync", fsync)
    _check_full_disk_message(_refused(tmp_path, monkeypatch, disk_full), tmp_path)


def test_an_unwritable_folder_is_not_called_a_full_disk(tmp_path, monkeypatch):
    def denied(monkeypatch):
        def fsync(fd):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(weights.os, "fsync", fsync)
    message = _refused(tmp_path, monkeypatch, denied)
    assert message.startswith(f"could not write 'full.safetensors' in {tmp_path}: Permission denied. Make the folder "
                              "writable for the user ComfyUI runs as"), message


# ----------------------------------------------------------------------------- the header alone
def test_a_lora_files_rank_and_layout_come_from_its_header_without_reading_a_tensor(tmp_path, monkeypatch):
    path = tmp_path / "rank.safetensors"
    safetensors.torch.save_file(_lora(0.01, rank=4096, width=256), str(path), metadata={"siso.best_iteration": "3"})
    for module, name in ((safetensors.torch, "load"), (safetensors.torch, "load_file"), (safetensors, "safe_open")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a tensor was read"))
    # every byte the reader takes from the file: the first bytes it sniffs for the format (512: a
    # pickle, a zip or a safetensors header?) and the header, not the 8 MB of tensors
    read = []

    class Counted:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, n=-1):
            data = self.handle.read(n)
            read.append(len(data))
            return data
    monkeypatch.setattr(weights, "open", lambda *a, **k: Counted(open(*a, **k)), raising=False)
    rank, header = lora_mod.lora_file_layout(str(path), "rank.safetensors")
    assert (rank, header) == (4096, {"siso.best_iteration": "3"})
    with open(path, "rb") as handle:
        header_bytes = 8 + int.from_bytes(handle.read(8), "little")
    assert header_bytes <= sum(read) <= 4 * max(512, header_bytes) < os.path.getsize(path) // 1000, read
    problem = lora_mod.warm_start_rank_problem(rank, 4)
    assert "trains ranks 1 to 128 (lora_rank)" in problem and "set lora_rank to 4096" not in problem
    assert lora_mod.warm_start_rank_problem(8, 4) == "initial_lora has rank 8 but lora_rank is 4: set lora_rank to 8"


@pytest.mark.parametrize("change, expect", [
    (lambda t: t.update({"diffusion_model.x.lora_down.weight": t["diffusion_model.x.lora_down.weight"].long()}),
     "the lora_down of layer diffusion_model.x holds int64 numbers"),
    (lambda t: t.pop("diffusion_model.x.lora_up.weight"), "has a lora_down but no lora_up"),
    (lambda t: t.update({"diffusion_model.x.lora_up.weight": torch.zeros(64, 8)}),
     "has a lora_up of rank 8 and a lora_down of rank 4"),
    (lambda t: t.update({"unet.x.lora_A.weight": t.pop("diffusion_model.x.lora_down.weight"),
                         "unet.x.lora_B.weight": t.pop("diffusion_model.x.lora_up.weight")}) or t.pop("diffusion_model.x.alpha"),
     "its layout is diffusers / PEFT"),
])
def test_an_impossible_lora_file_is_refused_from_its_header(tmp_path, change, expect):
    tensors = _lora(0.01)
    change(tensors)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(lora_mod.LoRAFileError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        lora_mod.lora_file_layout(str(path), "bad.safetensors")


def test_a_lora_that_changes_nothing_is_told(tmp_path):
    zero_alpha = _lora(0.5)
    zero_alpha["diffusion_model.x.alpha"] = torch.tensor(0.0)
    assert lora_mod.changes_nothing(zero_alpha) == "the alpha of every one of its 1 layers is 0"
    zero_up = _lora(0.5)
    zero_up["diffusion_model.x.lora_up.weight"].zero_()
    assert lora_mod.changes_nothing(zero_up) == "the lora_up of every one of its 1 layers is all zeros"
    assert lora_mod.changes_nothing(_lora(0.5)) is None
