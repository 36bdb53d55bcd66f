"""Faults every training script must survive, run for each script in `training_scripts.SCRIPTS`: a kill while a
checkpoint or the final model is written (resume is bit-identical), NaN (stopped, or skipped within a bound, never
`nan` in the card), an unreachable Hub (bounded, one line, model untouched, token never printed)."""

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from training_scripts import SCRIPTS, SUBPROCESS_ENV, TeacherDirs, load_script

from diffusers_onestep.training_utils import NonFiniteError, list_checkpoints


PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a handwritten digit", "a pet"]
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"
cases = pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else []) for case in SCRIPTS]
)


@pytest.fixture(scope="session")
def teacher_dirs(tiny_teacher_dir, tmp_path_factory):
    """Tiny teachers by backbone (SD: the shared `tiny_teacher_dir`; SDXL and PixArt saved on first use)."""
    return TeacherDirs(tmp_path_factory.mktemp("backbone-teachers"), sd=tiny_teacher_dir)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _weights(case, output_dir) -> dict:
    return load_file(os.path.join(output_dir, case.network, "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def _run_killed_at(case, argv, marker: str, cwd):
    """Runs the script in a subprocess that SIGKILLs itself right after the first file whose path holds `marker`."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        import safetensors.torch
        import diffusers_onestep.training_utils.loop as loop

        save_file = safetensors.torch.save_file
        def killing_save_file(tensors, filename, *args, **kwargs):
            save_file(tensors, filename, *args, **kwargs)
            if {marker!r} in str(filename):
                os.kill(os.getpid(), signal.SIGKILL)
        loop.save_file = killing_save_file
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from training_scripts import SCRIPTS, load_script
        case = next(c for c in SCRIPTS if c.id == {case.id!r})
        load_script(case).main({argv!r})
        """
    )
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True)


def _count_steps(case, monkeypatch) -> list:
    cls, method = case.loss_class(), case.loss[2]
    original, calls = getattr(cls, method), []
    monkeypatch.setattr(cls, method, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@cases
def test_resume_after_kill_during_checkpoint_save_matches_uninterrupted_run(
    case, teacher_dirs, prompts_file, tmp_path, monkeypatch
):
    script, tiny_teacher_dir = load_script(case), teacher_dirs[case.backbone]
    common = ["--max_train_steps=4", "--checkpointing_steps=2", "--use_ema", "--lr_scheduler=linear"]
    script.main(case.argv(tiny_teacher_dir, prompts_file, tmp_path / "straight", *common))

    killed = tmp_path / "killed"
    argv = case.argv(tiny_teacher_dir, prompts_file, killed, *common)
    result = _run_killed_at(case, argv, ".checkpoint-4.partial", tmp_path)
    assert result.returncode == -9, result.stderr[-3000:]
    # the kill left a hidden partial save; the previous checkpoint is complete and the only one listed
    assert (killed / ".checkpoint-4.partial").is_dir()
    assert [os.path.basename(p) for p in list_checkpoints(killed)] == ["checkpoint-2"]
    assert not (killed / "model_index.json").exists()

    calls = _count_steps(case, monkeypatch)
    script.main(argv + ["--resume_from_checkpoint=latest"])
    assert len(calls) == 2  # steps 3 and 4 only: the run continued from checkpoint-2
    assert not (killed / ".checkpoint-4.partial").exists()
    _assert_same_weights(_weights(case, killed), _weights(case, tmp_path / "straight"))


@cases
def test_kill_during_final_save_leaves_no_loadable_half_model_and_resume_completes(
    case, teacher_dirs, prompts_file, tmp_path, monkeypatch
):
    script, tiny_teacher_dir = load_script(case), teacher_dirs[case.backbone]
    common = ["--max_train_steps=2", "--checkpointing_steps=2"]
    script.main(case.argv(tiny_teacher_dir, prompts_file, tmp_path / "straight", *common))
    expected = _weights(case, tmp_path / "straight")
    # the run dies after the first file of the final save (an exception where a kill would be: the save has no
    # cleanup, so the disk is left as a SIGKILL leaves it)
    import diffusers.models.modeling_utils as modeling_utils

    original = modeling_utils.safetensors.torch.save_file

    def dying_save_file(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        if ".final.partial" in str(filename):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(modeling_utils.safetensors.torch, "save_file", dying_save_file)
    out = tmp_path / "final"
    argv = case.argv(tiny_teacher_dir, prompts_file, out, *common)
    with pytest.raises(KeyboardInterrupt):
        script.main(argv)
    # nothing visible claims to be a model: no marker, no component folder; the half-written save is hidden
    assert (out / ".final.partial").is_dir()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    # a second save into a directory holding a model leaves that model complete until the new one is
    monkeypatch.setattr(modeling_utils.safetensors.torch, "save_file", original)
    before = _tree_digest(tmp_path / "straight")
    monkeypatch.setattr(modeling_utils.safetensors.torch, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        script.main(case.argv(tiny_teacher_dir, prompts_file, tmp_path / "straight", *common, "--seed=1"))
    assert _tree_digest(tmp_path / "straight") == before

    monkeypatch.setattr(modeling_utils.safetensors.torch, "save_file", original)
    calls = _count_steps(case, monkeypatch)
    script.main(argv + ["--resume_from_checkpoint=latest"])
    assert calls == [] and not (out / ".final.partial").exists()  # nothing left to train: only the save ran
    _assert_same_weights(_weights(case, out), expected)
    assert isinstance(case.pipeline_class.from_pretrained(out), case.pipeline_class)


def _nan_from_step(case, monkeypatch, first_nan_call: int):
    cls, method = case.loss_class(), case.loss[2]
    original, calls = getattr(cls, method), []

    def nan_loss(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= first_nan_call:
            loss = loss * float("nan")
            logs = {k: v * float("nan") for k, v in logs.items()}
        return loss, logs

    monkeypatch.setattr(cls, method, nan_loss)
    return calls


@cases
def test_nan_stops_or_skips_within_the_bound_and_never_reaches_the_card(
    case, teacher_dirs, prompts_file, tmp_path, monkeypatch
):
    script, tiny_teacher_dir = load_script(case), teacher_dirs[case.backbone]
    calls = _nan_from_step(case, monkeypatch, first_nan_call=2)
    out = tmp_path / "raise"
    with pytest.raises(NonFiniteError, match="optimizer step 1.*--nan_policy skip"):
        script.main(case.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=3", "--checkpointing_steps=1"))
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / "trainable_0.safetensors").values())
    assert not (out / case.network).exists()

    # every step from the second on fails: 2 skips are tolerated, the third stops the run, nothing is saved
    calls.clear()
    out = tmp_path / "bounded"
    skip = ["--nan_policy=skip", "--max_nan_skips=2", "--nan_skip_window=10", "--checkpointing_steps=100"]
    with pytest.raises(NonFiniteError, match="3 of the last 10 optimizer steps were skipped.*--max_nan_skips 2"):
        script.main(case.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=6", *skip))
    assert len(calls) == 4 and not (out / "model_index.json").exists()

    # within the bound the run finishes; the final (skipped, NaN) metrics are written as n/a, never nan
    calls.clear()
    out = tmp_path / "skip"
    script.main(case.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=3", *skip))
    assert all(torch.isfinite(t).all() for t in _weights(case, out).values())
    card = (out / "README.md").read_text()
    assert "| n/a |" in card and "| nan |" not in card and "| inf |" not in card


def _hanging_server(deadline_s: float):
    """A TCP server on 127.0.0.1 that accepts connections and never answers; stops itself after `deadline_s`."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def serve():
        end = time.monotonic() + deadline_s
        while not stop.is_set() and time.monotonic() < end:
            try:
                connection, _ = server.accept()
                held.append(connection)
            except OSError:
                continue
        for connection in held:
            connection.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], stop, thread, held


def _tree_digest(path) -> dict:
    digests = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith((".", "checkpoint-", "logs"))]  # the model's own files
        for name in names:
            full = os.path.join(root, name)
            if name != "README.md" and not name.startswith("."):
                digests[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return digests


def _files_containing(path, needle: str) -> list[str]:
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if needle.encode() in open(full, "rb").read():
                found.append(full)
    return found


@cases
def test_unreachable_hub_fails_in_bounded_time_with_one_line_and_leaks_no_token(
    case, teacher_dirs, prompts_file, tmp_path
):
    """A real run (subprocess) whose HF_ENDPOINT accepts connections and never answers; the token comes from HF_TOKEN."""
    tiny_teacher_dir = teacher_dirs[case.backbone]
    port, stop, thread, held = _hanging_server(deadline_s=120)
    out = tmp_path / "hub"
    argv = case.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=1", "--push_to_hub")
    argv += ["--hub_model_id=someone/student", "--hub_timeout=1", "--hub_retries=1", "--report_to=tensorboard"]
    env = {**SUBPROCESS_ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": FAKE_TOKEN}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, str(case.path), *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
    finally:
        stop.set()
        thread.join(5)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-3000:]
    assert held, "the run never reached the Hub endpoint"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Hub upload to someone/student failed"), result.stderr[-3000:]
    assert f"the model is saved locally at {out}" in last
    assert f"hf upload someone/student {out} . --repo-type model --exclude 'checkpoint-*'" in last
    assert "Traceback" not in result.stderr
    assert elapsed < 120  # import + 1 step + (2 tries x 1 s timeout + 1 s back-off): far from the 16 min hang
    # the saved model is complete and loads; nothing of the run holds the token
    assert (out / "model_index.json").is_file() and not (out / ".final.partial").exists()
    digest = _tree_digest(out)
    assert isinstance(case.pipeline_class.from_pretrained(out), case.pipeline_class)
    assert _tree_digest(out) == digest
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert _files_containing(tmp_path, FAKE_TOKEN) == []


@pytest.mark.slow
@cases
def test_failed_accelerate_launch_prints_no_token_given_through_hf_token(case, teacher_dirs, prompts_file, tmp_path):
    """
    `accelerate launch` prints the failed command (argv included) when a run fails; the child cannot prevent that, so
    the token must come from HF_TOKEN / `hf auth login`, and `--hub_token` on the command line is warned about.
    """
    tiny_teacher_dir = teacher_dirs[case.backbone]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1"]
    launch += ["--mixed_precision=no", "--dynamo_backend=no"]
    # fails after argument parsing: 6 is not a multiple of the tiny teacher's 4
    argv = case.argv(tiny_teacher_dir, prompts_file, tmp_path / "out", "--resolution=6", "--push_to_hub")
    env = {**SUBPROCESS_ENV, "HF_TOKEN": FAKE_TOKEN}
    result = subprocess.run([*launch, str(case.path), *argv], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "--resolution" in result.stderr
    assert FAKE_TOKEN not in result.stdout + result.stderr and _files_containing(tmp_path, FAKE_TOKEN) == []

    # the same failure with the token on the command line: accelerate's error report shows it (what the warning says)
    result = subprocess.run(
        [*launch, str(case.path), *argv, "--hub_token", FAKE_TOKEN], env=SUBPROCESS_ENV, cwd=tmp_path,
        capture_output=True, text=True,
    )  # fmt: skip
    assert "`--hub_token` was given on the command line" in result.stderr and "accelerate launch" in result.stderr
    assert FAKE_TOKEN in result.stderr  # accelerate's CalledProcessError lists the command
    assert _files_containing(tmp_path, FAKE_TOKEN) == []  # but nothing on disk holds it
