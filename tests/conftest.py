"""Fixtures: tiny random Kandinsky 2.2 repos and image sets on disk, and a runner that launches the real scripts
with `accelerate launch` in a subprocess, offline."""

import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

PRIOR_SCRIPT = str(REPO / "train_text_to_image_prior.py")
DECODER_SCRIPT = str(REPO / "train_text_to_image_decoder.py")


def offline_env(**extra):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "DIFFUSERS_VERBOSITY": "warning", "HF_HUB_DISABLE_TELEMETRY": "1"})
    env.pop("KANDINSKY_TRAIN_FAULT", None)
    env.update(extra)
    return env


def launch_command(script, args, launcher=None):
    """`accelerate launch [launcher flags] script args`, as a user types it."""
    launcher = launcher or ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, script, *map(str, args)]


def launch(script, args, *, env=None, check=True, launcher=None, timeout=900, console=False):
    """Run a training script as a user does, in a subprocess; fail with its output unless check=False. console:
    stderr into stdout, as a terminal shows them (proc.stderr is then None)."""
    proc = subprocess.run(launch_command(script, args, launcher), cwd=REPO, env=env or offline_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if console else subprocess.PIPE,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{(proc.stderr or '')[-6000:]}")
    return proc


def checkpoints(output_dir):
    return sorted((p.name for p in Path(output_dir).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def built_once(tmp_path_factory, name, build):
    """{name: path} of build(folder), run once per test session: pytest-xdist's workers share the first one's
    folders (a lock and a file of the paths in the session's folder, above each worker's)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(json.dumps({k: str(v) for k, v in build(root / name).items()}))
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny prior + decoder repos, an image folder and a parquet dataset, built once per session."""
    import tiny_kandinsky

    return built_once(tmp_path_factory, "tiny", lambda root: tiny_kandinsky.build_all(str(root)))


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory):
    """A tiny inpainting decoder (UNet in_channels 9) and a parquet data set with a `mask` column (white = repaint)."""
    import tiny_kandinsky

    return built_once(tmp_path_factory, "tiny-inpaint", lambda root: {
        "decoder": tiny_kandinsky.build_tiny_decoder(root / "decoder", decoder_type="inpaint"),
        "data": tiny_kandinsky.build_paired_dataset(root / "data", "mask")})


@pytest.fixture(scope="session")
def tiny_controlnet(tmp_path_factory):
    """A tiny depth-ControlNet decoder (addition_embed_type image_hint) and a parquet data set with a
    `conditioning_image` column."""
    import tiny_kandinsky

    return built_once(tmp_path_factory, "tiny-controlnet", lambda root: {
        "decoder": tiny_kandinsky.build_tiny_decoder(root / "decoder", decoder_type="controlnet"),
        "data": tiny_kandinsky.build_paired_dataset(root / "data", "hint")})


@pytest.fixture
def no_model_loads(monkeypatch):
    """Test hook for refusals promised "before any model loads" (in-process runs): loading a model or pipeline fails
    the test, so a check moved after the loading shows up as this error instead of its own line."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran before the refusal")

    for owner in (ModelMixin, DiffusionPipeline, PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(refuse))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a folder on a fresh tmpfs of that size ("1m"), unmounted after the test; or a skip that says why
    there cannot be one (mounting needs root on Linux)."""
    mounted = []

    def mount(size):
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def base_args(tiny, output_dir, steps=4, **overrides):
    """A small, fast command line shared by most tests."""
    args = {
        "--pretrained_prior_model_name_or_path": tiny["prior"],
        "--pretrained_decoder_model_name_or_path": tiny["decoder"],
        "--train_data_dir": tiny["images"],
        "--output_dir": output_dir,
        "--resolution": 64,
        "--train_batch_size": 2,
        "--max_train_steps": steps,
        "--learning_rate": 1e-3,
        "--lr_warmup_steps": 0,
        "--checkpointing_steps": 1000,
        "--seed": 0,
        "--report_to": "none",
        "--validation_inference_steps": 2,
    }
    args.update(overrides)
    flat = []
    for key, value in args.items():
        if value is None:
            continue
        flat.append(key)
        if value is True:
            continue
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return flat


def read_state(checkpoint_dir):
    return json.loads((Path(checkpoint_dir) / "training_state.json").read_text())


@contextlib.contextmanager
def warnings_seen():
    """The messages of every warning a block raises (warnings module) or logs at WARNING or above, in a list filled
    when the block ends. diffusers and transformers log through their own handlers, not the root logger's."""
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("", "diffusers", "transformers", "huggingface_hub")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    seen.extend(str(w.message) for w in caught)
