"""kandinsky_train.images: every PIL mode becomes the RGB a person expects, the decoder's crop, the card's grid."""

import numpy as np
from PIL import Image

from kandinsky_train.images import center_crop_resize, image_grid, image_name, image_size, open_rgb, to_rgb


def test_16_bit_greyscale_keeps_its_tones():
    array = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    source = Image.fromarray(array)
    assert source.mode.startswith("I;16")
    image = to_rgb(source)
    rgb = np.asarray(image)
    assert image.mode == "RGB" and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 120 <= rgb[32, 0, 0] <= 135  # mid-grey stays mid-grey, not clipped to white


def test_dark_16_bit_greyscale_stays_dark_and_float_pictures_span_0_to_1(tmp_path):
    """The range comes from the mode: a 16-bit PNG whose brightest pixel is 200/65535 is nearly black (not read as
    8-bit), and a float ("F") picture at 0.5 is mid-grey (not clipped to black)."""
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dark16.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I;16") and Image.open(tmp_path / "half.tif").mode == "F"
    assert np.asarray(open_rgb(str(tmp_path / "dark16.png"))).max() <= 1
    assert np.asarray(open_rgb(str(tmp_path / "half.tif"))).tolist()[0][0] == [128, 128, 128]


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


def test_header_size_is_the_size_training_opens_exif_rotation_included(tmp_path):
    """Buckets are chosen from the files' headers: a phone photo stored 80x48 with EXIF "rotate 90" opens 48x80,
    a JPEG and a TIFF alike (turned once, not twice)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (80, 48)).save(tmp_path / "phone.jpg", exif=exif)
    Image.new("RGB", (80, 48)).save(tmp_path / "plain.png")
    for orientation in (5, 6, 7, 8):  # Pillow's TIFF reader reports (and decodes) these turned itself
        exif[0x0112] = orientation
        Image.new("RGB", (80, 48)).save(tmp_path / f"turned{orientation}.tif", exif=exif)
    for name, size in (("phone.jpg", (48, 80)), ("plain.png", (80, 48)), *((f"turned{o}.tif", (48, 80))
                                                                          for o in (5, 6, 7, 8))):
        for cell in (str(tmp_path / name), {"path": None, "bytes": (tmp_path / name).read_bytes()}):
            assert image_size(cell) == open_rgb(cell).size == size


def test_center_crop_to_a_bucket_keeps_the_middle_at_its_aspect_ratio():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (50, 0, 250, 100))  # blue except 50 px at each end
    out = center_crop_resize(image, (160, 80))  # 2:1 of a 3:1 picture: 200 px of the middle
    assert out.size == (160, 80) and np.asarray(out)[:, [0, -1], 0].max() < 10
