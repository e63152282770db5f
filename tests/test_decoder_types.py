"""The three Kandinsky 2.2 decoders (issue 21): which one a UNet is comes from its configuration; a flag or a
--decoder_type that does not fit it is refused in one line before anything is written. The inpainting and
ControlNet decoders' training is tested in test_inpainting.py and test_controlnet.py."""

import re

import pytest

from conftest import base_args
from test_robustness import error_line, run_in_process


def test_the_decoder_type_is_read_from_the_unet_configuration():
    from kandinsky_train.decoders import detect

    real = {"in_channels": 4, "addition_embed_type": "image"}  # kandinsky-2-2-decoder's
    assert detect(real) == "text2img"
    assert detect({**real, "in_channels": 9}) == "inpaint"  # kandinsky-2-2-decoder-inpaint's
    assert detect({**real, "in_channels": 8, "addition_embed_type": "image_hint"}) == "controlnet"


@pytest.mark.parametrize("model, overrides, message", [
    ("text2img", {"--decoder_type": "inpaint"},
     r"--decoder_type inpaint: the UNet of .* is a text-to-image decoder \(in_channels 4, addition_embed_type "
     r"'image'\). Give the matching decoder, or --decoder_type text2img."),
    ("text2img", {"--mask_column": "mask"},
     "--mask_column is for the inpainting decoder; --pretrained_decoder_model_name_or_path is a text-to-image "
     "decoder."),
    ("text2img", {"--validation_image": "x.png"},
     "--validation_image is for the inpainting or ControlNet decoder; .* is a text-to-image decoder."),
    ("controlnet", {"--decoder_type": "text2img"},
     r"the UNet of .* is a depth-ControlNet decoder \(in_channels 8, addition_embed_type 'image_hint'\)"),
    ("controlnet", {"--validation_mask_image": "m.png"}, "--validation_mask_image is for the inpainting decoder"),
    ("inpaint", {"--decoder_type": "controlnet"}, r"is an inpainting decoder \(in_channels 9,"),
    ("text2img", {"--conditioning_image_column": "depth"},
     "--conditioning_image_column is for the ControlNet decoder; --pretrained_decoder_model_name_or_path is a "
     "text-to-image decoder."),
    # given explicitly, even with the value that is its default on the ControlNet decoder
    ("inpaint", {"--conditioning_image_column": "conditioning_image"},
     "--conditioning_image_column is for the ControlNet decoder; .* is an inpainting decoder."),
])
def test_a_flag_or_type_that_does_not_fit_the_decoder_is_refused(tiny, tiny_inpaint, tiny_controlnet, tmp_path,
                                                                  capsys, model, overrides, message):
    import train_text_to_image_decoder

    decoder = {"text2img": tiny["decoder"], "inpaint": tiny_inpaint["decoder"],
               "controlnet": tiny_controlnet["decoder"]}[model]
    args = base_args(tiny, tmp_path / "out", **{"--pretrained_decoder_model_name_or_path": decoder, **overrides})
    error = run_in_process(train_text_to_image_decoder, args, capsys)
    assert re.search(message, error_line(error, overrides)), error[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_decoder_is_refused_before_any_model_loads(tiny, tiny_inpaint, tmp_path, capsys):
    """Issue 29: an inpainting decoder resumed from a text-to-image decoder's checkpoint in the same --output_dir
    (or the reverse) failed with "size mismatch for conv_in.weight" once the models had loaded; as a LoRA adapter
    (attention layers only, the same shapes in every decoder) it would load into the wrong model without a word.
    Checkpoints record their decoder's type; an older one's is read from the UNet configuration it holds."""
    import json

    import train_text_to_image_decoder
    from fakes import fake_checkpoint

    def checkpoint_of(name, folder="unet", recorded=None, config=None):
        path = fake_checkpoint(tmp_path / name / "checkpoint-2", folder, 2)
        if recorded:
            (path / "training_state.json").write_text(json.dumps({"global_step": 2, "decoder_type": recorded}))
        if config:
            (path / folder / "config.json").write_text(json.dumps(config))
        return path.parent

    cases = [
        (tiny_inpaint["decoder"], checkpoint_of("t2i", recorded="text2img"), {},
         r"checkpoint-2 is a text-to-image decoder's checkpoint, and --pretrained_decoder_model_name_or_path .* is an "
         r"inpainting decoder: resume it with the text-to-image decoder it was trained from, or train this one in "
         "another --output_dir."),
        (tiny["decoder"], checkpoint_of("older", config={"in_channels": 9}), {},
         "checkpoint-2 is an inpainting decoder's checkpoint, and .* is a text-to-image decoder"),
        (tiny["decoder"], checkpoint_of("lora", folder="unet_lora", recorded="controlnet"), {"--use_lora": True},
         "checkpoint-2 is a depth-ControlNet decoder's checkpoint, and .* is a text-to-image decoder"),
    ]
    for decoder, output_dir, overrides, message in cases:
        args = base_args(tiny, output_dir, **{"--pretrained_decoder_model_name_or_path": decoder,
                                              "--resume_from_checkpoint": "latest", **overrides})
        error = run_in_process(train_text_to_image_decoder, args, capsys)
        assert re.search(message, error_line(error, output_dir)), error[-2000:]
        assert "Loading" not in error and sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-2"]
