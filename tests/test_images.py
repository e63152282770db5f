"""kandinsky_train.images: every PIL mode becomes the RGB a person expects, the decoder's crop, the card's grid."""

import numpy as np
from PIL import Image

from kandinsky_train.images import center_crop_resize, image_grid, image_name, open_rgb, to_rgb


def test_16_bit_greyscale_keeps_its_tones():
    array = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    source = Image.fromarray(array)
    assert source.mode.startswith("I;16")
    image = to_rgb(source)
    rgb = np.asarray(image)
    assert image.mode == "RGB" and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 120 <= rgb[32, 0, 0] <= 135  # mid-grey stays mid-grey, not clipped to white


def test_transparent_pixels_become_white_and_cmyk_palette_convert():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [0, 255, 0] + [0, 0, 0] * 252)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [0, 255, 0]


def test_cells_open_from_paths_bytes_and_images(tmp_path):
    Image.new("RGB", (4, 2), (1, 2, 3)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    for cell in (str(tmp_path / "a.png"), {"path": str(tmp_path / "a.png"), "bytes": None},
                 {"path": None, "bytes": data}, Image.open(tmp_path / "a.png")):
        assert np.asarray(open_rgb(cell))[0, 0].tolist() == [1, 2, 3]
    assert image_name({"path": None, "bytes": data}) == "<bytes>"
    assert image_name(str(tmp_path / "a.png")) == str(tmp_path / "a.png")


def test_center_crop_keeps_the_middle_of_a_landscape_picture():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # a blue square in the middle third
    out = center_crop_resize(image, 32)
    assert out.size == (32, 32)
    assert np.asarray(out)[16, 16].tolist() == [0, 0, 255] and np.asarray(out)[:, :].mean(axis=(0, 1))[0] < 10


def test_grid_has_four_columns_at_most():
    grid = image_grid([Image.new("RGB", (8, 6)) for _ in range(5)])
    assert grid.size == (32, 12)
