"""Bad input as a careless user types it (issue: bad input never trains silently, never overwrites the user's model,
never ends in a traceback): one line, exit 2, nothing written; what is valid but suspicious trains with a warning;
a run that diverges stops before it saves a non-finite model."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch
from fakes import fake_checkpoint
from test_robustness import error_line, run_in_process


def write_metadata(folder, tiny, rows, raw=None):
    """An image folder with the tiny set's pictures and a metadata.jsonl of `rows` (or the bytes `raw`)."""
    shutil.copytree(tiny["images"], folder, ignore=shutil.ignore_patterns("metadata.*"))
    (folder / "metadata.jsonl").write_bytes(raw if raw is not None else
                                            "\n".join(json.dumps(row) for row in rows).encode())
    return folder


def stage_checkpoint(folder, step, stage, record=True):
    """A complete checkpoint of ours written by `stage` (recording it, or only by its model folder, as before)."""
    path = folder / f"checkpoint-{step}"
    (path / {"prior": "prior", "decoder": "unet"}[stage]).mkdir(parents=True)
    state = {"global_step": step, "seed": 0, **({"stage": stage} if record else {})}
    (path / "training_state.json").write_text(json.dumps(state))
    return path


def test_bad_values_and_folders_are_refused_before_anything_is_written(tiny, tmp_path, capsys, no_model_loads):
    import train_text_to_image_decoder
    import train_text_to_image_prior

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    images = sorted(p.name for p in tiny["images"].glob("*.png"))
    non_utf8 = write_metadata(tmp_path / "non_utf8", tiny, None,
                              raw=f'{{"file_name": "{images[0]}", "text": "caf\xe9"}}\n'.encode("latin-1"))
    escaping = write_metadata(tmp_path / "escaping", tiny, [{"file_name": "../../x.png", "text": "a"}])
    shared = tmp_path / "shared"  # the prior trained here first
    stage_checkpoint(shared, 2, "prior")
    older = tmp_path / "older"  # a prior checkpoint from before checkpoints recorded their stage
    stage_checkpoint(older, 4, "prior", record=False)
    prior_saved = tmp_path / "prior_saved"  # the prior's final save, no checkpoint left
    prior_saved.mkdir()
    (prior_saved / "model_index.json").write_text('{"_class_name": "KandinskyV22PriorPipeline"}')
    holds_data = tmp_path / "holds_data"  # the training images in OUT/unet: the final save would write among them
    shutil.copytree(tiny["images"], holds_data / "unet")
    user_readme = tmp_path / "user_readme"  # the user's own notes, where the model card would go
    user_readme.mkdir()
    (user_readme / "README.md").write_text("# My experiments\n")
    full, lora = tmp_path / "full", tmp_path / "lora"  # a full fine-tune's and a LoRA run's complete checkpoints
    fake_checkpoint(full / "checkpoint-2", "unet", 2)
    fake_checkpoint(lora / "checkpoint-2", "unet_lora", 2)
    cases = [
        (PRIOR_SCRIPT, {"--learning_rate": "nan"}, "--learning_rate must be a finite number, got nan"),
        (DECODER_SCRIPT, {"--learning_rate": -1e-4}, "--learning_rate must be at least 0, got -0.0001"),
        (DECODER_SCRIPT, {"--learning_rate": 4e39}, r"--learning_rate 4e\+39 is beyond float32's range \(3.403e\+38\)"),
        (PRIOR_SCRIPT, {"--adam_beta1": 1.5}, r"--adam_beta1 must be in \[0, 1\), got 1.5"),
        (PRIOR_SCRIPT, {"--report_to": "foo"}, "Unknown --report_to 'foo'; choose one of .*tensorboard.*, all or none"),
        (DECODER_SCRIPT, {"--dataloader_num_workers": -1}, "--dataloader_num_workers must be at least 0"),
        (DECODER_SCRIPT, {"--snr_gamma": 0}, "--snr_gamma must be a positive number .*got 0.0"),
        (PRIOR_SCRIPT, {"--snr_gamma": -5}, "--snr_gamma must be a positive number .*trains nothing or in reverse"),
        (DECODER_SCRIPT, {"--output_dir": a_file}, "--output_dir .*a_file' is a file, not a folder"),
        (PRIOR_SCRIPT, {"--output_dir": "/sys/kandinsky-output"},
         "--output_dir '/sys/kandinsky-output' cannot be written .*: choose a folder you can write to"),
        (DECODER_SCRIPT, {"--output_dir": tiny["decoder"]},
         "--output_dir .* is --pretrained_decoder_model_name_or_path .*: the run would write its checkpoints and "
         "final save over what it reads"),
        (PRIOR_SCRIPT, {"--output_dir": tiny["prior"] / "fine-tuned"},
         "--output_dir .* is inside --pretrained_prior_model_name_or_path"),
        (PRIOR_SCRIPT, {"--output_dir": tiny["images"] / "out"}, "--output_dir .* is inside --train_data_dir"),
        (DECODER_SCRIPT, {"--resolution": 72},
         "--resolution 72 does not fit the decoder: MoVQ and the UNet together divide each side by 16, so the side "
         "must be a multiple of 16; the nearest are 64 or 80"),
        (DECODER_SCRIPT, {"--output_dir": shared, "--resume_from_checkpoint": "latest"},
         r"--output_dir .* holds the prior's training \(checkpoint-2\); this is the decoder. Give each stage its own "
         "--output_dir"),
        (DECODER_SCRIPT, {"--output_dir": shared}, r"holds the prior's training \(checkpoint-2\)"),
        (DECODER_SCRIPT, {"--output_dir": older, "--resume_from_checkpoint": "checkpoint-4"},
         r"holds the prior's training \(checkpoint-4\)"),
        (DECODER_SCRIPT, {"--output_dir": prior_saved},
         r"holds the prior's training \(the final KandinskyV22PriorPipeline in model_index.json\)"),
        (PRIOR_SCRIPT, {"--output_dir": ""}, "--output_dir is empty: name the folder"),
        (DECODER_SCRIPT, {"--output_dir": holds_data, "--train_data_dir": holds_data / "unet"},
         "--output_dir .*holds_data' contains --train_data_dir .*unet': the run would write its final save"),
        (DECODER_SCRIPT, {"--output_dir": user_readme},
         "--output_dir .* holds a README.md that is not a model card of these scripts: the final save writes its "
         "model card as README.md and would replace it"),
        (DECODER_SCRIPT, {"--resume_from_checkpoint": shared / "checkpoint-2"},
         r"'.*shared/checkpoint-2' is the prior's checkpoint \(prior/\), and this is the decoder: resume the decoder "
         "from a checkpoint of its own"),
        (DECODER_SCRIPT, {"--output_dir": full, "--resume_from_checkpoint": "latest", "--use_lora": True},
         r"checkpoint-2 is a full fine-tune's checkpoint \(unet/, no unet_lora/\) and this run has --use_lora: "
         "resume it without --use_lora"),
        (DECODER_SCRIPT, {"--output_dir": lora, "--resume_from_checkpoint": "checkpoint-2"},
         r"checkpoint-2 is a LoRA checkpoint \(unet_lora/\) and this run trains the whole model: resume it with "
         "--use_lora"),
        (DECODER_SCRIPT, {"--output_dir": lora, "--resume_from_checkpoint": "latest"},
         "checkpoint-2 is a LoRA checkpoint"),
        (DECODER_SCRIPT, {"--output_dir": full, "--resume_from_checkpoint": "latest", "--use_ema": True},
         "checkpoint-2 holds no unet_ema/ that this --use_ema run needs to resume: it was saved without --use_ema "
         r"\(resume it without --use_ema\) or lost the folder \(restore it\)."),
        (PRIOR_SCRIPT, {"--train_data_dir": non_utf8},
         "Could not read the image folder .* and its metadata file: UnicodeDecodeError: 'utf-8' codec can't decode "
         "byte 0xe9"),
        (DECODER_SCRIPT, {"--train_data_dir": escaping},
         "Could not read the image folder .* metadata file: ValueError: Invalid metadata file_name '../../x.png'"),
    ]
    if not torch.cuda.is_available():
        cases.append((DECODER_SCRIPT, {"--mixed_precision": "fp16"},
                      "--mixed_precision fp16 needs a GPU and this run is on the CPU: use --mixed_precision bf16"))
    modules = {PRIOR_SCRIPT: train_text_to_image_prior, DECODER_SCRIPT: train_text_to_image_decoder}
    before = {folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
              for folder in (tiny["prior"], tiny["decoder"], tiny["images"], shared, older, prior_saved, holds_data,
                             user_readme, full, lora)}
    for script, overrides, message in cases:
        error = run_in_process(modules[script], base_args(tiny, tmp_path / "out", **overrides), capsys)
        line = error_line(error, overrides)
        assert re.search(message, line), f"{overrides}: expected {message!r} in\n{line}"
        assert not (tmp_path / "out").exists(), overrides
    after = {folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) for folder in before}
    assert after == before  # the models, the images and the other stage's work: untouched


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    """A learning rate that blows up: the loss turns NaN; the run stops with one line that names the step and the
    value, keeps the checkpoints of the steps before, and saves neither that step nor a "fine-tuned" model."""
    out = tmp_path / "out"
    proc = launch(DECODER_SCRIPT, base_args(tiny, out, steps=6, **{"--learning_rate": 1e30,
                                                                   "--checkpointing_steps": 1}), check=False)
    assert proc.returncode != 0
    error = re.search(r"error: Training diverged: the training loss was (\S+) at step (\d+)\. Nothing from that step "
                      r"on was saved\. The last good checkpoint is checkpoint-(\d+): resume from it "
                      r"\(--resume_from_checkpoint checkpoint-\3\) with a lower --learning_rate", proc.stderr)
    assert error, proc.stderr[-3000:]
    value, step, last = error.group(1), int(error.group(2)), int(error.group(3))
    for folder in checkpoints(out):  # every checkpoint kept holds finite weights, as the README promises
        weights = [load_file(f) for f in (out / folder).rglob("*.safetensors")]
        assert weights and all(torch.isfinite(t).all() for w in weights for t in w.values()), folder
        saved = torch.load(out / folder / "optimizer.bin", weights_only=False)
        assert all(torch.isfinite(v).all() for s in saved["state"].values() for v in s.values() if torch.is_tensor(v))
    assert value in ("nan", "inf", "-inf") and last == step - 1
    assert checkpoints(out) == [f"checkpoint-{s}" for s in range(1, step)]
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()


@pytest.fixture(scope="module")
def path_columns(tiny, tmp_path_factory):
    """A local data set whose image column holds paths relative to its own folder (one of them missing), another
    that holds the encoded files as raw bytes, and empty captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("path_columns")
    (root / "pictures").mkdir()
    (root / "dataset").mkdir()
    names = sorted(p.name for p in tiny["images"].glob("*.png"))[:4]
    for name in names:
        shutil.copy(tiny["images"] / name, root / "pictures" / name)
    paths = [f"../pictures/{name}" for name in names] + ["../pictures/missing.png"]
    files = [root / "dataset" / path for path in paths]
    table = pa.table({"path": paths, "raw": [f.read_bytes() if f.exists() else b"" for f in files],
                      "text": [""] * len(paths)})
    pq.write_table(table, root / "dataset" / "train.parquet")
    return root


@pytest.mark.parametrize("column", ["path", "raw"])
def test_image_columns_of_paths_and_bytes_are_read_from_the_data_set(column, path_columns, tiny, tmp_path):
    """Relative paths resolve against the data set's folder (not the working directory), a missing file is named
    where it was looked for, raw bytes decode as pictures; every caption empty and --learning_rate 0 train, with a
    warning each."""
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "out", steps=1, **{
        "--train_data_dir": None, "--dataset_name": path_columns / "dataset", "--image_column": column,
        "--learning_rate": 0}))
    text = proc.stdout + proc.stderr
    assert "4 examples (1 unreadable image(s) skipped" in text
    missing = (path_columns / "pictures" / "missing.png") if column == "path" else "row 4 <bytes>"
    assert f"Skipping unreadable image {missing}:" in text
    assert "Every caption in column 'text' is empty: the prior will learn one image embedding for no words" in text
    assert "--learning_rate 0: the weights will not change" in text


def test_an_error_during_training_starts_its_own_line_below_the_progress_bar(capsys):
    """main_guard closes an open progress bar first: the bar leaves its line with a newline, not a carriage return
    that the error would write over."""
    import sys

    from tqdm import tqdm

    from kandinsky_train.errors import fail, main_guard

    bar = tqdm(total=4, desc="Steps", file=sys.stderr)
    bar.update(1)
    with pytest.raises(SystemExit):
        main_guard(lambda: fail("a mask of 32x32 pairs with a picture of 64x64"))
    lines = capsys.readouterr().err.split("\n")
    assert lines[-2] == "error: a mask of 32x32 pairs with a picture of 64x64" and "Steps" in lines[-3]


def test_data_and_hub_problems_are_named_where_they_are(tiny, tmp_path, capsys, tmpfs, monkeypatch):
    """What datasets and the loaders would blame on something else is named where it is, in one line, before any
    weight loads: a metadata.jsonl's bad line (file and line from 1), a shard that is not parquet (streamed or not),
    a column of URLs (not downloaded), a datasets cache that cannot be written (not the image folder), a Hub model
    id while offline (not the model), and an --embedding_cache_dir inside what the run reads."""
    import subprocess

    import datasets
    import huggingface_hub
    import train_text_to_image_decoder
    import train_text_to_image_prior

    rows = [json.loads(line) for line in (tiny["images"] / "metadata.jsonl").read_text().splitlines()]
    lines = [json.dumps(row) for row in rows]
    lines[2] = lines[2].replace('"text"', '"text', 1)  # line 3: a quote lost
    bad_line = write_metadata(tmp_path / "bad_line", tiny, None, raw="\n".join(lines).encode())
    shards = tmp_path / "shards"
    shutil.copytree(tiny["parquet"], shards)
    (shards / "data" / "train-00000-of-00001.parquet").rename(shards / "data" / "train-00000-of-00002.parquet")
    (shards / "data" / "train-00001-of-00002.parquet").write_text("image,text\nnot,parquet\n")
    urls = tmp_path / "urls"
    urls.mkdir()
    (urls / "train.csv").write_text("image,text\n../a.png,a cat\nhttps://example.com/b.png,a dog\n")
    read_only = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    parquet = {"--train_data_dir": None, "--dataset_name": shards, "--image_column": "img",
               "--caption_column": "caption"}
    hub_id = "kandinsky-community/kandinsky-2-2-decoder"
    cases = [
        (PRIOR_SCRIPT, {"--train_data_dir": bad_line},
         r"Could not read the image folder --train_data_dir .*bad_line': '.*bad_line/metadata.jsonl' line 3 is not "
         r"JSON \(Expecting ':' delimiter, column \d+\)"),
        (PRIOR_SCRIPT, parquet, r"--dataset_name '.*shards': the shard '.*train-00001-of-00002.parquet' is not a "
                                r"readable parquet file \(ArrowInvalid: .*\)\. Replace it"),
        (PRIOR_SCRIPT, {**parquet, "--streaming": True}, r"the shard '.*train-00001-of-00002.parquet' is not a "
                                                         r"readable parquet file"),
        (PRIOR_SCRIPT, {"--train_data_dir": None, "--dataset_name": urls},
         r"--image_column 'image' of '.*urls' holds URLs \(1 row\(s\), the first row 1: "
         r"'https://example.com/b.png'\): pictures are not downloaded"),
        (DECODER_SCRIPT, {"--cache_dir": read_only},
         rf"The datasets cache '{read_only}' \(--cache_dir\) cannot be written \(Read-only file system\): .* Give "
         "--cache_dir a folder you can write to"),
        (DECODER_SCRIPT, {"--pretrained_decoder_model_name_or_path": hub_id},
         rf"from --pretrained_decoder_model_name_or_path '{hub_id}': offline mode is on \(HF_HUB_OFFLINE=1\) and "
         rf"'{hub_id}' is not \(completely\) in the Hugging Face cache"),
        (DECODER_SCRIPT, {"--cache_embeddings": True, "--embedding_cache_dir": tiny["decoder"] / "cache"},
         "--embedding_cache_dir .* is inside --pretrained_decoder_model_name_or_path .*: the cache would write its "
         "files into what the run reads"),
        (PRIOR_SCRIPT, {"--cache_embeddings": True, "--embedding_cache_dir": tiny["images"]},
         "--embedding_cache_dir .* is --train_data_dir"),
    ]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    modules = {PRIOR_SCRIPT: train_text_to_image_prior, DECODER_SCRIPT: train_text_to_image_decoder}
    for script, overrides, message in cases:
        error = run_in_process(modules[script], base_args(tiny, tmp_path / "out", **overrides), capsys)
        line = error_line(error, overrides)
        assert re.search(message, line), f"{overrides}: expected {message!r} in\n{line}"
        assert not (tmp_path / "out").exists() and not (tiny["decoder"] / "cache").exists(), overrides
    # HF_HOME's datasets cache read-only: named with the variable that put it there
    monkeypatch.setenv("HF_HOME", str(read_only))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", read_only / "datasets")
    line = error_line(run_in_process(train_text_to_image_prior, base_args(tiny, tmp_path / "out"), capsys))
    assert re.search(rf"The datasets cache '{read_only}/datasets' \(HF_HOME\) cannot be written", line), line
