"""data/framing.py: an image of any size in the model's frame, and points back, checked with a bright dot."""
import numpy as np
import pytest

from sce_mae_jax.data import framing, pipeline


def _dot_image(h, w, x, y):
    im = np.zeros((h, w, 3), np.uint8)
    im[y - 2:y + 3, x - 2:x + 3] = 255
    return im


@pytest.mark.parametrize('hw, dot, crop, box', [
    ((230, 170), (90, 120), 'center', None),       # taller than wide: the centred square is rows 30..199
    ((150, 410), (215, 70), 'center', None),
    ((120, 200), (60, 40), 'none', None),           # the whole image squeezed to 96 x 96
    ((300, 260), (140, 150), 'center', (100, 110, 180, 200)),   # a 300W-style window around the box
])
def test_a_dot_comes_back_where_it_was(hw, dot, crop, box):
    image = _dot_image(*hw, *dot)
    frame = framing.frame_for(hw, 96, crop, box)
    model = framing.to_model_image(image, frame)
    assert model.shape == (96, 96, 3)
    lum = model.astype(np.float32).sum(-1)
    ys, xs = np.nonzero(lum > 0.5 * lum.max())
    w = lum[ys, xs]
    seen = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])   # the dot's centroid in the model input
    back = frame.to_original(seen)
    np.testing.assert_allclose(back, dot, atol=0.6)
    np.testing.assert_allclose(frame.to_model(dot), seen, atol=0.6 * 96 / min(frame.height, frame.width) + 0.3)
    np.testing.assert_allclose(frame.to_model(frame.to_original(seen)), seen, atol=1e-9)


def test_a_136_face_frame_is_the_evaluation_crop():
    """The synthetic faces are rendered in the 136-px protocol frame: `center` must give exactly the centre
    96 the evaluation reads (pipeline.eval_transform), and points move by the 20-px margin."""
    image = np.random.default_rng(0).integers(0, 256, (136, 136, 3), dtype=np.uint8)
    frame = framing.frame_for((136, 136), 96)
    np.testing.assert_array_equal(framing.to_model_image(image, frame),
                                  pipeline.eval_transform(96)({'image': image})['image'])
    np.testing.assert_allclose(frame.to_original([[0.0, 0.0], [95.0, 40.5]]), [[20, 20], [115, 60.5]], atol=1e-12)


def test_a_window_leaving_the_image_is_padded_with_zeros():
    image = np.full((100, 100, 3), 200, np.uint8)
    frame = framing.frame_for((100, 100), 96, box=(0, 0, 60, 60))   # a window wider than the image, off its corner
    assert frame.top < 0 and frame.left < 0
    model = framing.to_model_image(image, frame)
    assert model[0, 0].max() == 0 and model[-1, -1].max() == 200


def test_bad_crop_and_box_are_value_errors():
    with pytest.raises(ValueError, match='crop='):
        framing.frame_for((10, 10), 96, 'middle')
    with pytest.raises(ValueError, match='x1 > x0'):
        framing.frame_for((10, 10), 96, box=(5, 5, 5, 9))
