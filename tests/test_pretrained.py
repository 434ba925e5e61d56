"""Published-weight architectures (RLFN, SPAN, RFDN) and the grey conversion.

The checkpoints here are random weights in the published layout (the trunks' own ``state_dict``
at 3 colours, saved and read back with ``torch.load(weights_only=True)``), so the tests run
without the published files; the layout itself is pinned by the key count, value count and
a few shapes read off the real files (benchmarks/bench_pretrained.py loads those strictly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medsr.models import build_generator
from medsr.models import rfdn, rlfn, span
from medsr.models.published import grey_state_dict, rgb_reference_output

# name, scale, module, trunk class, (number of tensors, number of values, {key: shape}) of the published file
PUBLISHED = [
    ("rlfn", 2, rlfn, rlfn.RLFNTrunk, (114, 526_856, {"conv_1.weight": (52, 3, 3, 3),
                                                     "block_6.esa.conv4.weight": (52, 16, 1, 1),
                                                     "upsampler.0.weight": (12, 52, 3, 3)})),
    ("rlfn", 4, rlfn, rlfn.RLFNTrunk, (114, 543_740, {"upsampler.0.weight": (48, 52, 3, 3)})),
    ("span", 4, span, span.SPANTrunk, (44, 150_688, {"conv_1.eval_conv.weight": (28, 3, 3, 3),
                                                    "conv_cat.weight": (28, 112, 1, 1),
                                                    "upsampler.0.bias": (48,)})),
    ("rfdn", 4, rfdn, rfdn.RFDNTrunk, (128, 433_448, {"fea_conv.weight": (50, 3, 3, 3),
                                                     "B4.esa.conv3_.weight": (12, 12, 3, 3),
                                                     "c.0.weight": (50, 200, 1, 1)})),
]
IDS = [f"{name}-x{scale}" for name, scale, *_ in PUBLISHED]


def random_published_checkpoint(trunk_class: type[torch.nn.Module], scale: int, path: Path) -> dict:
    """A checkpoint file in the published layout with random weights, read back as a user would."""
    torch.manual_seed(scale)
    torch.save(trunk_class(scale).state_dict(), path)
    return torch.load(path, weights_only=True, map_location="cpu")


def grey_image(h: int = 29, w: int = 34, seed: int = 0) -> torch.Tensor:
    """A smooth grey image in [0, 1] with an exact-0 corner (the MR/CT background case)."""
    field = gaussian_filter(np.random.default_rng(seed).random((h, w)), 2.0)
    image = (field - field.min()) / (field.max() - field.min())
    image[: h // 3, : w // 3] = 0.0
    return torch.from_numpy(image.astype(np.float32))[None, None]


@pytest.mark.parametrize(("name", "scale", "module", "trunk_class", "layout"), PUBLISHED, ids=IDS)
def test_a_checkpoint_in_the_published_layout_loads_strictly(name, scale, module, trunk_class, layout,
                                                             tmp_path: Path) -> None:
    state = random_published_checkpoint(trunk_class, scale, tmp_path / "published.pth")
    count, values, shapes = layout
    assert len(state) == count and sum(v.numel() for v in state.values()) == values
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    trunk_class(scale).load_state_dict(state, strict=True)
    # The grey generator loads its converted state strictly too.
    generator = build_generator(name, scale)
    generator.load_state_dict(grey_state_dict(state, module.LAYOUT, generator), strict=True)


@pytest.mark.parametrize(("name", "scale", "module", "trunk_class", "layout"), PUBLISHED, ids=IDS)
def test_the_grey_network_equals_the_rgb_reference_on_a_grey_input(name, scale, module, trunk_class, layout,
                                                                   tmp_path: Path) -> None:
    state = random_published_checkpoint(trunk_class, scale, tmp_path / "published.pth")
    reference = trunk_class(scale)
    reference.load_state_dict(state, strict=True)
    generator = build_generator(name, scale)
    generator.load_state_dict(grey_state_dict(state, module.LAYOUT, generator), strict=True)
    # float64, so that what is compared is the conversion, not float32 rounding: random weights fed
    # 255-scale input make activations in the hundreds (the real SPAN x4 in float32: 9e-6).
    x = torch.cat([grey_image(), grey_image(seed=1)]).double()
    reference, generator = reference.double(), generator.double()
    with torch.no_grad():
        expected = rgb_reference_output(reference.eval(), x, module.LAYOUT)
        got = generator.train()(x)  # unclamped: compare the networks, not the clamp
    assert got.shape == (2, 1, 29 * scale, 34 * scale)
    assert float((got - expected).abs().max()) <= 1e-5, float((got - expected).abs().max())
    # The reference does depend on the colours (the test would pass for a colour-blind reference otherwise).
    rgb = module.LAYOUT.input_range * (x.expand(-1, 3, -1, -1)
                                       - torch.tensor(module.LAYOUT.rgb_mean, dtype=x.dtype).view(1, 3, 1, 1))
    with torch.no_grad():
        colours = reference(rgb) / module.LAYOUT.output_range
    assert float((colours[:, 0] - colours[:, 2]).abs().max()) > 1e-3


def test_the_conversion_refuses_a_checkpoint_that_is_not_rgb() -> None:
    generator = build_generator("rlfn", 4)
    grey = {key.removeprefix("trunk."): value for key, value in generator.state_dict().items()
            if key.startswith("trunk.")}
    with pytest.raises(ValueError, match=r"conv_1.weight has 1 input channels, expected 3"):
        grey_state_dict(grey, rlfn.LAYOUT, generator)


# --------------------------------------------------------------------------- the published file as an input

import hashlib  # noqa: E402
import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import yaml  # noqa: E402

from medsr.data.sources.errors import SourceError  # noqa: E402
from medsr.pretrained import CheckpointInit, fetch_checkpoint, load_published, pretrained_stage  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: several reads, a cut in the middle
URL = "https://example.invalid/model_zoo/rlfn_x4.pth"


def init_for(payload: bytes = PAYLOAD, sha256: str | None = None) -> CheckpointInit:
    return CheckpointInit(file="rlfn_x4.pth", url=URL, sha256=sha256 or hashlib.sha256(payload).hexdigest(),
                          licence="Apache-2.0", source="a test's server")


class FakeServer:
    """The HTTP client boundary (``urlopen``'s shape): serves ``payload``, honours Range unless told
    not to, can cut the body after ``cut_after`` bytes once, or be unreachable."""

    def __init__(self, payload: bytes = PAYLOAD, *, cut_after: int | None = None, honour_range: bool = True,
                 offline: bool = False) -> None:
        self.payload, self.cut_after, self.honour_range, self.offline = payload, cut_after, honour_range, offline
        self.ranges: list[str | None] = []

    def __call__(self, request: urllib.request.Request, timeout: float) -> FakeServer._Response:
        assert request.full_url == URL and timeout > 0
        self.ranges.append(request.get_header("Range"))
        if self.offline:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        start = 0
        if request.get_header("Range") and self.honour_range:
            start = int(request.get_header("Range").removeprefix("bytes=").rstrip("-"))
        cut, self.cut_after = self.cut_after, None
        return self._Response(self.payload[start:], 206 if start else 200, cut)

    class _Response:
        def __init__(self, body: bytes, status: int, cut: int | None) -> None:
            self.stream, self.status, self.cut, self.sent = io.BytesIO(body), status, cut, 0

        def read(self, n: int) -> bytes:
            if self.cut is not None and self.sent >= self.cut:
                raise ConnectionResetError("connection reset by peer")
            chunk = self.stream.read(n if self.cut is None else min(n, self.cut - self.sent))
            self.sent += len(chunk)
            return chunk

        def __enter__(self) -> FakeServer._Response:
            return self

        def __exit__(self, *exc: object) -> None:
            return None


def test_a_checkpoint_is_downloaded_checked_and_moved_into_place(tmp_path: Path) -> None:
    server = FakeServer()
    result = fetch_checkpoint(init_for(), tmp_path, opener=server, sleep=lambda _s: None)
    assert result["status"] == "downloaded" and result["licence"] == "Apache-2.0"
    assert (tmp_path / "rlfn_x4.pth").read_bytes() == PAYLOAD
    assert not list((tmp_path / ".partial").iterdir())
    # Found the second time: checked, not fetched.
    assert fetch_checkpoint(init_for(), tmp_path, opener=server)["status"] == "found" and len(server.ranges) == 1


def test_a_cut_download_resumes_from_the_bytes_it_has(tmp_path: Path) -> None:
    server = FakeServer(cut_after=300_000)
    with pytest.raises(SourceError, match="downloading .*rlfn_x4.pth still failing after 1 attempts"):
        fetch_checkpoint(init_for(), tmp_path, opener=server, retries=0)
    assert (tmp_path / ".partial" / "rlfn_x4.pth.part").stat().st_size == 300_000
    assert not (tmp_path / "rlfn_x4.pth").exists()  # never a half file under the final name
    fetch_checkpoint(init_for(), tmp_path, opener=server, retries=0)
    assert server.ranges == [None, "bytes=300000-"]
    assert (tmp_path / "rlfn_x4.pth").read_bytes() == PAYLOAD
    # A server that ignores Range sends everything again: the part is rewritten, not appended to.
    ignoring = FakeServer(cut_after=100_000, honour_range=False)
    (tmp_path / "rlfn_x4.pth").unlink()
    with pytest.raises(SourceError):
        fetch_checkpoint(init_for(), tmp_path, opener=ignoring, retries=0)
    fetch_checkpoint(init_for(), tmp_path, opener=ignoring, retries=0)
    assert (tmp_path / "rlfn_x4.pth").read_bytes() == PAYLOAD


def test_the_wrong_sha256_is_refused_naming_the_file(tmp_path: Path) -> None:
    wrong = init_for(sha256="0" * 64)
    # Downloaded bytes that do not match: retried, then refused; nothing under the final name.
    with pytest.raises(SourceError, match=r"downloading .*/rlfn_x4.pth still failing after 2 attempts \(the "
                                          r"downloaded bytes have sha256 [0-9a-f]{64}, expected 0{64}\)") as err:
        fetch_checkpoint(wrong, tmp_path, opener=FakeServer(), retries=1, sleep=lambda _s: None)
    assert "\n" not in str(err.value) and str(tmp_path / "rlfn_x4.pth") in str(err.value)
    assert not (tmp_path / "rlfn_x4.pth").exists()
    # A file placed by hand with other bytes: refused, named, kept for the user to look at.
    (tmp_path / "rlfn_x4.pth").write_bytes(PAYLOAD[:-1])
    with pytest.raises(SourceError, match=rf"{tmp_path / 'rlfn_x4.pth'} has sha256 [0-9a-f]{{64}}, "
                                          rf"expected {init_for().sha256}"):
        fetch_checkpoint(init_for(), tmp_path, opener=FakeServer())
    assert (tmp_path / "rlfn_x4.pth").read_bytes() == PAYLOAD[:-1]


def test_init_entries_are_checked() -> None:
    good = init_for().as_dict()
    assert CheckpointInit.from_mapping(good, "init") == init_for()
    for broken, message in [({**good, "sha256": "ABC"}, "64 lower-case hex"), ({**good, "file": "../x.pth"}, "file name"),
                            ({k: v for k, v in good.items() if k != "licence"}, r"missing \['licence'\]"),
                            ({**good, "url": "ftp://x"}, "http")]:
        with pytest.raises(ValueError, match=message):
            CheckpointInit.from_mapping(broken, "train.models.rlfn.x4.init")


def _params_with_init(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"]["models"] = {"rlfn": {"x4": {"init": init_for().as_dict()}}}
    params["data"]["download"] = {"retries": 1, "backoff_seconds": 0.0}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_offline_without_the_file_the_stage_says_in_one_line_what_to_put_where(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture) -> None:
    from medsr.stage_entry import run_stage

    monkeypatch.chdir(tmp_path)
    server = FakeServer(offline=True)
    monkeypatch.setattr(urllib.request, "urlopen", server)  # the client boundary; no network in tests
    assert run_stage("pretrained", pretrained_stage, params_path=_params_with_init(tmp_path)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and len(server.ranges) == 2  # retried once (data.download.retries), then one line
    assert lines[0].startswith("medsr pretrained: downloading pretrained/rlfn_x4.pth still failing")
    assert f"put the file from {URL} (sha256 {init_for().sha256}" in lines[0] and "at pretrained/rlfn_x4.pth" in lines[0]
    # Placed by hand, the same stage finds it and passes, offline.
    (tmp_path / "pretrained" / "rlfn_x4.pth").write_bytes(PAYLOAD)
    assert run_stage("pretrained", pretrained_stage, params_path=_params_with_init(tmp_path)) == 0
    assert len(server.ranges) == 2


def test_the_default_params_name_no_checkpoint_so_a_fresh_machine_needs_none(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert pretrained_stage(params, opener=FakeServer(offline=True)) == {"checkpoints": []}
    assert (tmp_path / "pretrained").is_dir()


def test_load_published_builds_the_grey_generator_and_refuses_another_layout(tmp_path: Path) -> None:
    random_published_checkpoint(rlfn.RLFNTrunk, 4, tmp_path / "rlfn_x4.pth")
    generator = load_published("rlfn", 4, tmp_path / "rlfn_x4.pth")
    assert generator.scale == 4 and generator(torch.rand(1, 1, 16, 16)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"not a published RLFN x2 checkpoint: .*upsampler.0.weight"):
        load_published("rlfn", 2, tmp_path / "rlfn_x4.pth")
    with pytest.raises(ValueError, match=r"not a published SPAN x4 checkpoint"):
        load_published("span", 4, tmp_path / "rlfn_x4.pth")
    with pytest.raises(ValueError, match="no published-weights layout"):
        load_published("espcn", 4, tmp_path / "rlfn_x4.pth")


# --------------------------------------------------------------------------- training from an init

def enabled_params() -> dict:
    """params.yaml with its commented-out RLFN entry switched on (the documented one switch)."""
    from medsr.pretrained import enable_commented_entry

    return yaml.safe_load(enable_commented_entry((REPO_ROOT / "params.yaml").read_text()))


def test_switching_the_entry_on_is_idempotent_and_refuses_a_file_without_it() -> None:
    from medsr.pretrained import enable_commented_entry

    text = (REPO_ROOT / "params.yaml").read_text()
    on = enable_commented_entry(text)
    assert on != text and enable_commented_entry(on) == on
    assert len(on.splitlines()) == len(text.splitlines())
    gated = yaml.safe_load(on)["train"]["models"]["rlfn"]["model_options"]["noise_gate"]
    assert gated == {"threshold": 0.005, "exponent": 8, "tuned_share": 0.875}
    with pytest.raises(ValueError, match="no commented-out `# rlfn:` entry"):
        enable_commented_entry("train:\n  models:\n    espcn: {}\n")


def test_the_commented_rlfn_entry_names_the_known_checkpoints() -> None:
    from medsr.pretrained import KNOWN_CHECKPOINTS, checkpoint_inits

    params = enabled_params()
    assert checkpoint_inits(params) == [("rlfn", 2, KNOWN_CHECKPOINTS[("rlfn", 2)]),
                                        ("rlfn", 4, KNOWN_CHECKPOINTS[("rlfn", 4)])]
    assert "rlfn" not in yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["models"]  # off by default


def test_training_with_an_init_starts_from_the_published_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_training import write_pair_sets

    from medsr.training import TrainConfig, load_generator, train_generator

    monkeypatch.chdir(tmp_path)
    pairs = write_pair_sets(tmp_path / "pairs", 2, hr_size=48, kinds=("standard",))
    (tmp_path / "pretrained").mkdir()
    state = random_published_checkpoint(rlfn.RLFNTrunk, 2, tmp_path / "pretrained" / "rlfn_x2.pth")
    digest = hashlib.sha256((tmp_path / "pretrained" / "rlfn_x2.pth").read_bytes()).hexdigest()
    init = {**init_for().as_dict(), "file": "rlfn_x2.pth", "sha256": digest}
    config = TrainConfig(model="rlfn", scale=2, pairs_root=str(pairs), out_dir=str(tmp_path / "out"), steps=2,
                         batch_size=2, lr_patch=16, lr_generator=1e-6, val_every=2, checkpoint_every=2, quiet=True,
                         init=init)
    train_generator(config)
    trained = load_generator(tmp_path / "out" / "last.pt").state_dict()
    published = load_published("rlfn", 2, tmp_path / "pretrained" / "rlfn_x2.pth").state_dict()
    fresh = build_generator("rlfn", 2).state_dict()
    gap = lambda a, b: float(sum((a[k] - b[k]).abs().max() for k in a))  # noqa: E731
    assert gap(trained, published) < 1e-3 < gap(fresh, published)
    assert len(state) == 114
    # Without the file, training refuses in one line naming it (it never downloads: that is the stage's job).
    (tmp_path / "pretrained" / "rlfn_x2.pth").unlink()
    with pytest.raises(SourceError, match=r"pretrained/rlfn_x2.pth is missing: run `dvc repro pretrained`"):
        train_generator(TrainConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "out2")}))


def test_the_model_card_names_the_published_weights_source_licence_and_sha256() -> None:
    from medsr.registry import model_card

    init = init_for()
    tags = {"model": "rlfn", "scale": "4", **{f"init_{k}": v for k, v in init.as_dict().items()}}
    card = model_card("medsr-x4", None, tags, {"action": "promoted", "reason": "a test"})
    assert (f"started from published weights: {init.source} ({init.url}), licence Apache-2.0, "
            f"sha256 `{init.sha256}`") in card
    assert "published weights" not in model_card("medsr-x4", None, {"model": "espcn", "scale": "4"}, {})


def test_the_benchmark_scores_a_published_reference_and_the_registry_never_promotes_it(tmp_path: Path) -> None:
    from test_training import downscale, smooth_image

    from medsr.benchmark import benchmark
    from medsr.consistency import ConsistencySettings
    from medsr.data.pairs import PairItem, write_pairs
    from medsr.registry import candidates_from_benchmark

    rng = np.random.default_rng(5)
    for split in ("val", "test"):
        for track in ("clean", "realistic"):
            items = []
            for i in range(2):
                hr = smooth_image(rng, 40)
                items.append(PairItem(f"{split}-{i}", ("mri", "xray")[i], hr, downscale(hr, 2)))
            write_pairs(tmp_path / split / "x2" / track, items, scale=2)
    torch.manual_seed(0)
    reference = build_generator("rlfn", 2)
    report = benchmark([], [2], tmp_path, tmp_path / "models", consistency=ConsistencySettings(steps=2),
                       latency_side=16, references={"rlfn@published": {2: reference}})
    scored = {(r["model"], r["track"], r["modality"]) for r in report["results"]}
    assert ("rlfn@published", "clean", "all") in scored and ("rlfn@published", "realistic", "mri") in scored
    assert report["models"]["rlfn@published"]["x2"]["phase"] == "published"
    assert {r["model"] for r in report["ablation"]} == {"rlfn@published"}  # the network alone, beside
    assert [c.model for c in candidates_from_benchmark(report, 2, "v")] == []
