"""Exact resume for every registered method, with each one's randomness switched on.

3 epochs straight vs. the same run killed after its 2nd epoch's commit and resumed (a fresh method, another global
RNG state) for the 3rd: the trainable weights must be bit-identical. Randomness exercised: the data order, SOWA's
mosaic + soft masks, Bayes-PFL's Monte-Carlo prompt samples, mosaic and image augmentation, AF-CLIP's adaptor
dropout; AnomalyCLIP / BAG-CLIP draw only the data order.
"""
import pytest
import torch
from safetensors.torch import load_file

import zsad.methods as M
from zsad.data import AnomalyDataset, load_samples
from zsad.train.loop import train

RANDOM = {  # config overrides that make a method draw random numbers while it trains (others: their profile as is)
    "anomalyclip": {},
    "bagclip": {},
    "afclip": {"adaptor": {"dropout": 0.2}},
    "sowa": {"augment": {"rate": 0.5, "datasets": []}},
    "bayespfl": {"augment": {"enabled": True, "mosaic_rate": 0.5}},
}
INFO = {"dataset": "MVTec AD"}  # the data set the papers' mosaics are tied to


class _Killed(Exception):
    pass


class _KillAtEpoch(torch.utils.data.Dataset):
    """The training set, raising when the loop starts epoch ``kill`` (as if the process died right after the
    previous epoch's commit)."""

    def __init__(self, base, kill):
        self.base, self.kill = base, kill

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]

    def set_epoch(self, epoch):
        if epoch == self.kill:
            raise _Killed
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


@pytest.fixture(scope="module")
def samples(synthetic):
    s = load_samples(synthetic, "test", classes=["brick"])
    good = [x for x in s if not x.label][:1]
    bad = [x for x in s if x.label][:3]
    return good + bad


@pytest.mark.slow
@pytest.mark.parametrize("name", M.available())
def test_resume_is_bit_identical(tmp_path, samples, name):
    def method():
        return M.create(name, "tiny", train={"epochs": 3, "batch_size": 2}, **RANDOM.get(name, {}))

    def dataset(m):
        return m.training_dataset(AnomalyDataset(samples, m.config.backbone.image_size), INFO)

    torch.manual_seed(1)
    straight = method()
    train(straight, dataset(straight), tmp_path / "straight", progress=False)

    killed = method()
    with pytest.raises(_Killed):
        train(killed, _KillAtEpoch(dataset(killed), kill=2), tmp_path / "resumed", progress=False)
    torch.manual_seed(2)  # the resumed process starts from another RNG state
    resumed = method()
    train(resumed, dataset(resumed), tmp_path / "resumed", resume=True, progress=False)

    a = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_loop_tells_the_dataset_each_epoch(tmp_path, samples):
    """Per-epoch augmentation (mosaics) is drawn from (seed, epoch, index): the loop must pass the real epoch, or
    every epoch repeats epoch 0's mosaics (a resume test cannot see that: both runs would repeat them)."""
    seen = []

    class Recording(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return self.base[i]

        def set_epoch(self, epoch):
            seen.append(epoch)

    m = M.create("anomalyclip", "tiny", train={"epochs": 3, "batch_size": 4})
    train(m, Recording(AnomalyDataset(samples, 224)), tmp_path / "a", progress=False)
    assert seen == [0, 1, 2]
    seen.clear()
    m = M.create("anomalyclip", "tiny", train={"epochs": 4, "batch_size": 4})
    train(m, Recording(AnomalyDataset(samples, 224)), tmp_path / "a", resume=True, progress=False)
    assert seen == [3]
