"""zsad.protocols: the papers' own scoring steps, each against a hand computation or a re-computation."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from zsad import ZsadError
from zsad import methods as M
from zsad import protocols as P
from zsad.methods import afclip as AF
from zsad.methods import bayespfl_protocol as BP
from zsad.methods import sowa as SO


def test_minmax_hand_case_and_degenerate_class():
    assert P.minmax([2.0, 4.0, 3.0]).tolist() == [0.0, 1.0, 0.5]
    # Bayes-PFL's eps: (x - 2) / (2 + 1e-8)
    assert P.minmax([2.0, 4.0], eps=1e-8)[1] == pytest.approx(2 / (2 + 1e-8), abs=0)
    assert P.minmax([0.7, 0.7, 0.7]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ZsadError, match="NaN"):
        P.minmax([0.1, float("nan")])
    with pytest.raises(ZsadError, match="1-D"):
        P.minmax([])


def test_bayespfl_topk_follows_the_released_class_list():
    for cls in ("capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum"):
        assert BP.bayespfl_topk(cls) == 20
    for cls in ("bottle", "pcb1", "metal_nut", "01"):
        assert BP.bayespfl_topk(cls) == 2000


def test_bayespfl_image_scores_hand_case():
    s_text = [0.2, 0.6, 1.0]  # -> 0, .5, 1
    s_img = [3.0, 1.0, 2.0]  # -> 1, 0, .5
    out = BP.bayespfl_image_scores(s_text, s_img)
    np.testing.assert_allclose(out, [0.5, 0.25, 0.75], atol=1e-7)
    # classification-only data sets: min-max(s_text) alone, s_img ignored
    np.testing.assert_allclose(BP.bayespfl_image_scores(s_text, None, classification_only=True), [0, 0.5, 1],
                               atol=1e-7)
    # the normalisation changes the ranking a plain 0.5/0.5 mix gives: labels 1 0 1 -> AUROC 1 vs 0.5
    labels = [1, 0, 1]
    s_text2, s_img2 = [0.50, 0.40, 0.41], [0.0, 10.0, 30.0]
    plain = 0.5 * np.array(s_text2) + 0.5 * np.array(s_img2)  # 0.25, 5.2, 15.2
    paper = BP.bayespfl_image_scores(s_text2, s_img2)  # .5*(1, 0, .1) + .5*(0, 1/3, 1) = .5, .1667, .55
    assert roc_auc_score(labels, plain) == 0.5
    assert roc_auc_score(labels, paper) == 1.0
    with pytest.raises(ZsadError, match="length"):
        BP.bayespfl_image_scores([0.1, 0.2], [0.3])


def test_classification_only_datasets():
    for name in ("HeadCT", "headct", "BrainMRI", "Brain MRI", "Br35H", "br35h"):
        assert P.is_classification_only(name)
    for name in ("MVTec AD", "VisA", None, ""):
        assert not P.is_classification_only(name)


def test_sowa_kshot_image_scores_hand_case():
    p = [0.1, 0.5, 0.9]
    map_max = [2.0, 4.0, 3.0]  # -> 0, 1, .5
    np.testing.assert_allclose(SO.sowa_kshot_image_scores(p, map_max), [0.05, 0.75, 0.7], atol=1e-12)


def test_paper_image_scores_dispatch():
    terms = {"s_text": np.array([0.2, 0.6, 1.0]), "topk20": np.array([3.0, 1.0, 2.0]),
             "topk2000": np.array([1.0, 2.0, 3.0]), "image_prob": np.array([0.1, 0.5, 0.9]),
             "map_max": np.array([2.0, 4.0, 3.0])}
    bayes = M.METHODS["bayespfl"]
    np.testing.assert_allclose(P.paper_image_scores(bayes, "screw", terms), [0.5, 0.25, 0.75], atol=1e-7)
    np.testing.assert_allclose(P.paper_image_scores(bayes, "bottle", terms), [0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(P.paper_image_scores(bayes, "bottle", terms, dataset="Br35H"), [0, 0.5, 1], atol=1e-7)
    np.testing.assert_allclose(P.paper_image_scores(M.METHODS["sowa"], "bottle", terms, shots=4), [0.05, 0.75, 0.7])
    assert P.paper_image_scores(M.METHODS["sowa"], "bottle", terms, shots=0) is None  # zero-shot: p alone, as zsad
    for name in set(M.available()) - {"bayespfl", "sowa"}:  # every other method: its released scores are per image
        assert P.paper_image_scores(M.METHODS[name], "bottle", terms, shots=4) is None
    modes = {name: P.paper_aupro_mode(M.METHODS[name]) for name in ("sowa", "bayespfl", "afclip", "bagclip")}
    assert modes == {"sowa": "sowa", "bayespfl": "anomalyclip", "afclip": "afclip", "bagclip": "anomalyclip"}


def test_draw_seeds_and_mean_std():
    assert P.paper_draw_seeds(M.METHODS["sowa"]) == (42, 2020, 2023, 2024, 2025)
    assert len(P.paper_draw_seeds(M.METHODS["afclip"])) == 5
    with pytest.raises(ZsadError, match="few-shot"):
        P.paper_draw_seeds(M.METHODS["bayespfl"])
    out = P.mean_std([{"image_auroc": 0.9, "pixel_aupro": float("nan")},
                      {"image_auroc": 0.7, "pixel_aupro": 0.5}])
    assert out["image_auroc"][0] == pytest.approx(0.8) and out["image_auroc"][1] == pytest.approx(0.1)
    assert out["pixel_aupro"] == (0.5, 0.0)
    assert all(math.isnan(v) for v in P.mean_std([{"x": float("nan")}])["x"])
    with pytest.raises(ZsadError):
        P.mean_std([])
    assert any("seeds [42, 2020" in line for line in P.describe(M.METHODS["sowa"], "MVTec AD", shots=4))


def test_check_protocol():
    P.check_protocol("paper")
    with pytest.raises(ZsadError, match="unknown protocol"):
        P.check_protocol("papers")


# == Bayes-PFL's class words ===========================================================================================
# Test data, written out from xiaozhen228/Bayes-PFL @ 8f155a0 (not from zsad): each converter of dataset/datasets/
# as the source folder names it reads and the new folder name it writes (its dataset_map / Change_name), the prompt
# table of models/VPB.py:8-18, and the class names of the shipped dataset/mvisa/data/meta_*.json (what test.py read).
RELEASE_SOURCE_FOLDERS = {
    "MVTec AD": ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
                 "tile", "toothbrush", "transistor", "wood", "zipper"],
    "VisA": ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"],
    "BTAD": ["01", "02", "03"],
    "DTD-Synthetic": ["Woven_127", "Woven_125", "Woven_104", "Woven_068", "Woven_001", "Stratified_154",
                      "Perforated_037", "Mesh_114", "Matted_069", "Marbled_078", "Fibrous_183", "Blotchy_099"],
    "DAGM": ["classes1", "classes2", "classes3", "classes4", "classes5", "classes7", "classes8"],
    "KSDD2": ["metal"], "RSDD": ["metal"],
    **{d: ["object"] for d in ("HeadCT", "BrainMRI", "Br35H", "ISIC", "ClinicDB", "ColonDB", "Endo", "Kvasir",
                               "TN3K")},
}


def _release_converter(dataset, folder):
    """The folder name each converter writes (dataset/datasets/<name>.py)."""
    if dataset in ("MVTec AD", "VisA"):
        return folder  # MVTec.py new_class_name = data_name; VisA.py Change_name returns the name
    if dataset == "BTAD":
        return {"01": "metal1", "02": "wood", "03": "metal2"}[folder]
    if dataset == "DTD-Synthetic":
        return {"Woven_127": "woven1", "Woven_125": "woven2", "Woven_104": "woven3", "Woven_068": "woven4",
                "Woven_001": "woven5", "Stratified_154": "stratified", "Perforated_037": "perforated",
                "Mesh_114": "mesh", "Matted_069": "matted1", "Marbled_078": "marbled2", "Fibrous_183": "fibrous",
                "Blotchy_099": "blotchy"}[folder]
    if dataset == "DAGM":  # dataset_map classesN -> fabricN, then Change_name: capitalize()
        return dict(zip([f"classes{i}" for i in [1, 2, 3, 4, 5, 7, 8]],
                        [f"fabric{i}" for i in [1, 2, 3, 4, 5, 7, 8]], strict=True))[folder].capitalize()
    if dataset == "KSDD2":  # Change_name: capitalize() only (its {"metal": "metal13"} is never read)
        return folder.capitalize()
    if dataset == "RSDD":  # Change_name: defect_map, then capitalize()
        return {"metal": "metal15"}[folder].capitalize()
    return {"HeadCT": "head ct", "BrainMRI": "brain ct", "Br35H": "brain", "ISIC": "skin", "ClinicDB": "colon",
            "ColonDB": "colon", "Endo": "colon", "Kvasir": "colon", "TN3K": "thyroid"}[dataset]


RELEASE_META_CLASSES = {  # the keys of dataset/mvisa/data/meta_<name>.json ("test"); TN3K ships none
    "MVTec AD": RELEASE_SOURCE_FOLDERS["MVTec AD"], "VisA": RELEASE_SOURCE_FOLDERS["VisA"],
    "BTAD": ["metal1", "metal2", "wood"],
    "DTD-Synthetic": ["blotchy", "fibrous", "marbled2", "matted1", "mesh", "perforated", "stratified", "woven1",
                      "woven2", "woven3", "woven4", "woven5"],
    "DAGM": ["Fabric1", "Fabric2", "Fabric3", "Fabric4", "Fabric5", "Fabric7", "Fabric8"],
    "KSDD2": ["Metal"], "RSDD": ["Metal15"], "HeadCT": ["head ct"], "BrainMRI": ["brain ct"], "Br35H": ["brain"],
    "ISIC": ["skin"], "ClinicDB": ["colon"], "ColonDB": ["colon"], "Endo": ["colon"], "Kvasir": ["colon"],
}


def _release_prompt(name):
    """models/VPB.py prompt_names: the class_mapping table (exact key), then "X " + lower()."""
    class_mapping = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
                     "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
                     "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}
    return "X " + class_mapping.get(name, name).lower()


def test_the_test_data_agrees_with_the_released_meta_files():
    for dataset, classes in RELEASE_META_CLASSES.items():
        assert sorted({_release_converter(dataset, f) for f in RELEASE_SOURCE_FOLDERS[dataset]}) == sorted(classes)


@pytest.mark.parametrize("dataset", sorted(RELEASE_SOURCE_FOLDERS))
def test_paper_class_words_are_the_released_prompts(dataset):
    for spelling in (dataset, dataset.lower().replace(" ", "").replace("-", "")):
        for folder in RELEASE_SOURCE_FOLDERS[dataset]:
            released = _release_prompt(_release_converter(dataset, folder))
            assert "X " + BP.class_words(folder, "paper", spelling) == released, (spelling, folder)
    # the converted layout itself (folders named as meta_*.json) gives the same words
    for name in RELEASE_META_CLASSES.get(dataset, []):
        assert "X " + BP.class_words(name, "paper", dataset) == _release_prompt(name)


def test_paper_class_words_elsewhere_keep_underscores():
    # data sets the release has no converter for (MPDD), or no data-set name: the prompt table, lower case, as is
    for dataset in ("MPDD", None, "my parts"):
        for folder in ("bracket_black", "Metal_Plate", "tubes", "pcb3", "pipe_fryum"):
            assert "X " + BP.class_words(folder, "paper", dataset) == _release_prompt(folder)
    assert BP.class_words("bracket_black", "paper", "MPDD") == "bracket_black"
    assert BP.class_words("Woven_127", "paper", None) == "woven_127"  # not renamed without the data set's name
    assert BP.class_words("Woven_127", "paper", "dtd") == "woven1"
    # one-class data sets: the release's single class, whatever the folder is called here
    assert BP.class_words("head_ct", "paper", "HeadCT") == "head ct"
    assert BP.class_words("good_and_bad", "paper", "KSDD2") == "metal"


def test_zsad_class_words_rule():
    """zsad's documented rule: lower case, "_" -> " ", whitespace collapsed, then the released prompt table."""
    cases = {"metal_nut": "metal nut", "PCB3": "printed circuit board", "pcb1": "printed circuit board",
             "chewinggum": "chewing gum", "macaroni2": "macaroni", "pipe_fryum": "pipe fryum", "bottle": "bottle",
             "  Bracket__Black ": "bracket black", "Woven_127": "woven 127", "01": "01"}
    for folder, words in cases.items():
        assert BP.class_words(folder) == words == BP.class_words(folder, "zsad", "BTAD")  # no data-set renaming
    # on MVTec AD and VisA, zsad's words are the released ones
    for dataset in ("MVTec AD", "VisA"):
        for folder in RELEASE_SOURCE_FOLDERS[dataset]:
            assert "X " + BP.class_words(folder) == _release_prompt(folder)


def test_class_words_errors_and_protocol_note():
    for bad in ("", "   ", None, 3):
        with pytest.raises(ZsadError, match="non-empty string"):
            BP.class_words(bad)
    with pytest.raises(ZsadError, match="unknown protocol"):
        BP.class_words("bottle", "papers")
    assert any("BTAD's converter" in line for line in P.describe(M.METHODS["bayespfl"], "BTAD"))
    assert any("underscores kept" in line for line in P.describe(M.METHODS["bayespfl"], "MPDD"))


# == AF-CLIP's ground-truth masks ======================================================================================
def _defect_mask(h, w, seed=0):
    """Thin lines, a small blob and scattered pixels: where bicubic and bilinear resizing disagree."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), bool)
    m[h // 4, :] = True
    m[:, w // 3:w // 3 + 2] = True
    m[h // 2:h // 2 + 5, w // 2:w // 2 + 7] = True
    return m | (rng.random((h, w)) < 0.01)


def _afclip_release_mask(mask, size):
    """AF-CLIP's test path, from its code: dataset/mvtec.py __getitem__ (np.array of the mask file, Image.fromarray),
    main.py:103-106 target_transform (torchvision Resize((S, S), BICUBIC), ToTensor), util/utils.py:241-243."""
    from zsad._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from PIL import Image
    from torchvision import transforms

    target_transform = transforms.Compose([
        transforms.Resize(size=(size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor()])
    gt = target_transform(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))
    gt[gt > 0.5] = 1
    gt[gt <= 0.5] = 0
    return gt.numpy()[0]


def _bicubic_weights(n_in, n_out, a=-0.5):
    """PIL's bicubic resampling weights from the filter's definition (support 2, widened when down-sampling)."""
    def k(x):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else (a * (((x - 5) * x + 8) * x - 4) if x < 2 else 0.0)

    s = n_in / n_out
    f = max(s, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * s
        lo, hi = max(int(c - 2 * f + 0.5), 0), min(int(c + 2 * f + 0.5), n_in)
        v = np.array([k((j - c + 0.5) / f) for j in range(lo, hi)])
        w[i, lo:hi] = v / v.sum()
    return w


@pytest.mark.parametrize("shape,size", [((300, 300), 224), ((64, 80), 224), ((700, 700), 518), ((37, 53), 16)])
def test_afclip_mask_is_the_released_test_path(shape, size):
    from zsad.data.transforms import preprocess_mask

    mask = _defect_mask(*shape)
    got = AF.afclip_mask(mask, size)
    assert got.dtype == np.float32 and got.shape == (size, size)
    np.testing.assert_array_equal(got, _afclip_release_mask(mask, size))
    # the kernel from its definition: PIL's horizontal pass, stored in 8 bits (rounded, clipped to 0..255), then the
    # vertical pass; equal wherever that value is clear of the 127.5 threshold by more than PIL's fixed-point rounding
    rows = np.clip(np.round(np.where(mask, 255.0, 0.0) @ _bicubic_weights(shape[1], size).T), 0, 255)
    v = _bicubic_weights(shape[0], size) @ rows
    clear = np.abs(v - 127.5) > 1.0
    assert clear.mean() > 0.97
    np.testing.assert_array_equal(got[clear], (v > 127.5)[clear].astype(np.float32))
    # zsad's own masks (bilinear floats) differ on these masks: a flipped filter would be caught
    if size > 16:
        assert (preprocess_mask(mask, size) != got).sum() > 50
    assert AF.afclip_mask(np.where(mask, 7, 0), size).tolist() == got.tolist()  # any nonzero value is a defect
    with pytest.raises(ZsadError, match="2-D mask"):
        AF.afclip_mask(np.zeros((4, 4, 3)), size)


def test_mask_transform_dispatch():
    from zsad.data.transforms import preprocess_mask

    assert P.mask_transform(M.METHODS["afclip"], "paper") is AF.afclip_mask
    for method, protocol in (("afclip", "zsad"), ("anomalyclip", "paper"), ("bayespfl", "paper"), ("sowa", "paper")):
        assert P.mask_transform(M.METHODS[method], protocol) is preprocess_mask
    with pytest.raises(ZsadError, match="unknown protocol"):
        P.mask_transform(M.METHODS["afclip"], "Paper")
    assert any("bicubic" in line for line in P.describe(M.METHODS["afclip"]))


def test_evaluate_scores_afclip_against_its_released_masks(tmp_path, monkeypatch):
    """zsad-eval under --protocol paper hands the metrics AF-CLIP's masks; under zsad, zsad's own."""
    from PIL import Image

    import zsad.metrics
    from zsad.data import load_samples
    from zsad.data.transforms import preprocess_mask
    from zsad.evaluate import evaluate

    rng = np.random.default_rng(1)
    mask = _defect_mask(300, 300, seed=2)
    for defect in ("good", "crack"):
        path = tmp_path / "part" / "test" / defect / "000.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(path)
    (tmp_path / "part" / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp_path / "part/ground_truth/crack/000_mask.png")
    seen = {}
    original = zsad.metrics.class_metrics

    def recording(labels, scores, masks, maps, **kw):
        seen["masks"] = masks.copy()
        return original(labels, scores, masks, maps, **kw)

    monkeypatch.setattr(zsad.metrics, "class_metrics", recording)
    samples = load_samples(tmp_path, "test")
    method = M.create("afclip", "tiny")
    for protocol, expected in (("paper", _afclip_release_mask(mask, 224)), ("zsad", preprocess_mask(mask, 224))):
        evaluate(method, samples, batch_size=2, progress=False, protocol=protocol)
        anomalous = [i for i, s in enumerate(sorted(samples, key=lambda s: str(s.image))) if s.label]
        np.testing.assert_array_equal(seen["masks"][anomalous[0]], expected > 0.5)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("k", [20, 2000])
def test_forward_with_terms_bayespfl(images, k):
    # The method's own score with topk = k is 0.5 s_text + 0.5 mean(top-k of the unsmoothed map): the terms must
    # reproduce it, and score / map must be the method's forward outputs.
    torch.manual_seed(0)
    m = M.create("bayespfl", "tiny", sampling={"samples": 2}, topk=k).eval()
    names = ["screw", "bottle"]
    with torch.no_grad():
        out = m(images, class_names=names)
        score, amap, terms = P.forward_with_terms(m, images, class_names=names)
    assert torch.equal(score, out.score) and torch.equal(amap, out.anomaly_map)
    assert set(terms) >= {"s_text", "image_prob", "topk20", "topk2000", "map_max"}
    expected = 0.5 * terms["s_text"] + 0.5 * terms[f"topk{k}"]
    np.testing.assert_allclose(out.score.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["map_max"], out.anomaly_map.flatten(1).amax(1).double().numpy())
    assert np.all(terms["topk20"] >= terms["topk2000"])  # the mean of a larger top-k is never larger


@pytest.mark.slow
def test_forward_with_terms_sowa_kshot(images):
    # zsad's K-shot score is 0.5 (p + (max(map) - lo) / scale) with calibration constants: the terms give p and
    # max(map), from which the paper's per-class min-max replaces (lo, scale).
    torch.manual_seed(0)
    m = M.create("sowa", "tiny").eval()
    with torch.no_grad():
        m.fit_memory(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
        out = m(images)
        score, amap, terms = P.forward_with_terms(m, images)
    assert torch.equal(score, out.score) and torch.equal(amap, out.anomaly_map)
    lo, scale = float(m.score_offset), float(m.config.k_shot.score_scale)
    expected = 0.5 * (terms["image_prob"] + (terms["map_max"] - lo) / scale)
    np.testing.assert_allclose(out.score.double().numpy(), expected, rtol=1e-5, atol=1e-6)
