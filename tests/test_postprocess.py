"""Post-processing against scipy (the Gaussian AnomalyCLIP applies per image on CPU) and F.interpolate."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsad.postprocess import Postprocess, gaussian_blur


@pytest.mark.parametrize("shape,sigma", [((2, 224, 224), 4.0), ((1, 37, 37), 4.0), ((3, 10, 7), 4.0),
                                         ((1, 5, 5), 1.5), ((2, 33, 20), 2.3)])
def test_gaussian_matches_scipy(shape, sigma):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    ref = np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in x.numpy().astype(np.float64)])
    assert np.abs(gaussian_blur(x, sigma).numpy() - ref).max() < 1e-5
    # float64 input: equal to rounding (the radius > size cases keep reflecting like scipy)
    assert np.abs(gaussian_blur(x.double(), sigma).numpy() - ref).max() < 1e-12


def test_gaussian_leading_axes_and_identity():
    x = torch.rand(2, 3, 16, 16)
    y = gaussian_blur(x, 2.0)
    torch.testing.assert_close(y[1, 2], gaussian_blur(x[1, 2], 2.0))
    assert gaussian_blur(x, 0) is x


def test_postprocess_module():
    pp = Postprocess(image_size=64, sigma=4.0, align_corners=False, score_map_weight=0.5)
    prob = torch.tensor([0.2, 0.9])
    patch = torch.rand(2, 8, 8)
    score, amap = pp(prob, patch)
    up = F.interpolate(patch[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ref = np.stack([gaussian_filter(m, 4.0) for m in up.numpy().astype(np.float64)])
    assert amap.shape == (2, 64, 64) and np.abs(amap.numpy() - ref).max() < 1e-5
    torch.testing.assert_close(score, prob + 0.5 * torch.from_numpy(ref).float().flatten(1).amax(1))
    score0, _ = Postprocess(64, score_map_weight=0.0)(prob, patch)
    torch.testing.assert_close(score0, prob)
