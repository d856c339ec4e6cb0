"""The data plane's small decisions, one by one: the in-domain verdict, the activation map and its PNG, the range
check of ``/invocations`` inputs, and how a refused or slow upload is named and timed out.

The routes around them are in test_app.py; these pin the boundaries and the words (mutmut on service.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from services.api.errors import ApiError, InvalidImage, PayloadTooLarge, Timeout, UnsupportedMediaType, refused_bare
from services.api.runtime import LoadedModel, Outputs
from services.api.service import Classifier, Upload, Verdict, _check_range, _which, explanation, heatmap_png, verdict
from shared.images import ImageLimits
from shared.labels import LABELS


def model(domain: float | None = 0.5, neither: float | None = None, outputs: Outputs | None = None) -> LoadedModel:
    return LoadedModel(
        name="m", version="1", alias="champion", run_id="r", labels=LABELS, forward=lambda x: x,
        domain_threshold=domain, outputs=outputs, neither_threshold=neither,
    )  # fmt: skip


def test_no_in_domain_score_is_no_verdict() -> None:
    assert verdict(np.array([0.2, 0.8, 9.0]), model(domain=None)) == Verdict()
    assert verdict(np.array([0.2, 0.8]), model()) == Verdict()  # the row has no distance column


def test_the_distance_verdict_is_strictly_above_the_threshold() -> None:
    m = model(domain=0.5)  # the column right after the probabilities
    assert verdict(np.array([0.2, 0.8, 0.5]), m) == Verdict(0.5, None, True)
    assert verdict(np.array([0.2, 0.8, 0.51]), m) == Verdict(0.51, None, False, "unlike_training_photos")
    assert type(verdict(np.array([0.2, 0.8, 0.5], np.float32), m).distance) is float


def test_p_neither_refuses_first_and_strictly_above_its_threshold() -> None:
    m = model(domain=0.5, neither=0.6, outputs=Outputs(distance=2, neither=3))
    assert verdict(np.array([0.2, 0.8, 0.1, 0.6]), m) == Verdict(0.1, 0.6, True)
    assert verdict(np.array([0.2, 0.8, 0.1, 0.61]), m) == Verdict(0.1, 0.61, False, "looks_like_refused_kind")
    # Far from the photos but not like a refused kind: the P(neither) is still reported.
    assert verdict(np.array([0.2, 0.8, 0.9, 0.1]), m) == Verdict(0.9, 0.1, False, "unlike_training_photos")
    # Both say "no": the refused kind is the more useful reason.
    assert verdict(np.array([0.2, 0.8, 0.9, 0.9]), m).reason == "looks_like_refused_kind"
    # A row without the P(neither) column, or a model without its threshold: the distance alone decides.
    assert verdict(np.array([0.2, 0.8, 0.1]), m) == Verdict(0.1, None, True)
    no_threshold = model(domain=0.5, outputs=Outputs(distance=2, neither=3))
    assert verdict(np.array([0.2, 0.8, 0.1, 0.99]), no_threshold) == Verdict(0.1, 0.99, True)
    no_column = model(domain=0.5, neither=0.6, outputs=Outputs(distance=2))
    assert verdict(np.array([0.2, 0.8, 0.1, 0.99]), no_column) == Verdict(0.1, None, True)


def test_the_activation_map_is_the_answer_s_side_of_it() -> None:
    m = model(outputs=Outputs(distance=2, explain=3, grid=2))
    row = np.array([0.9, 0.1, 0.2, 0.123456, -0.5, 0.0, 1.0], np.float32)  # as a forward pass returns it
    for_dandelion = explanation(row, m, "dandelion")
    assert for_dandelion["for"] == "dandelion" and for_dandelion["grid"] == [2, 2]
    assert for_dandelion["evidence"] == [[0.1235, -0.5], [0.0, 1.0]]
    assert for_dandelion["png"].startswith("data:image/png;base64,")
    assert explanation(row, m, "grass")["evidence"] == [[-0.1235, 0.5], [-0.0, -1.0]]  # dandelion minus grass
    assert explanation(row, model(outputs=Outputs(distance=2, explain=3, grid=0)), "grass") is None
    assert explanation(row, model(outputs=Outputs(distance=2, grid=2)), "grass") is None
    assert explanation(row, model(outputs=None), "grass") is None


def png_pixels(url: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,"), validate=True)))
    assert image.format == "PNG" and image.mode == "RGBA"
    return np.asarray(image)


def test_the_heatmap_is_orange_and_as_opaque_as_the_positive_evidence() -> None:
    pixels = png_pixels(heatmap_png(np.array([[2.0, 1.0], [-3.0, 0.0]])))
    assert pixels.shape == (2, 2, 4)
    assert (pixels[..., :3] == [255, 120, 0]).all()
    assert pixels[..., 3].tolist() == [[200, 100], [0, 0]]  # strongest 200 of 255; negatives clear
    assert png_pixels(heatmap_png(np.array([[-1.0, 0.0]])))[..., 3].tolist() == [[0, 0]]  # nothing argued for it
    assert png_pixels(heatmap_png(np.array([[0.5, 0.25]])))[..., 3].tolist() == [[200, 100]]  # relative to the top


@pytest.mark.parametrize(
    ("low", "high", "refusal"),
    [
        (0.0, 1.0, None),
        (-0.00099, 1.00099, None),  # within the tolerance of 1e-3: float rounding of x / 255
        (-0.0011, 0.5, "this input has values from -0.0011 to 0.5"),
        (0.0, 1.0011, "this input has values from 0 to 1.0011: divide 0-255 pixel values by 255"),
        (0.0, 255.0, "this input has values from 0 to 255: divide 0-255 pixel values by 255"),
        (0.0, 256.0, "this input has values from 0 to 256"),
        (-1.0, 200.0, "this input has values from -1 to 200"),
        (0.0, np.nan, "this input holds values that are not finite numbers"),
        (-np.inf, 0.5, "this input holds values that are not finite numbers"),
    ],
)
def test_inputs_must_be_pixel_values_in_the_unit_range(low: float, high: float, refusal: str | None) -> None:
    x = np.full((1, 4, 4, 3), 0.5, np.float32)
    x[0, 0, 0, 0], x[0, 1, 1, 1] = low, high
    if refusal is None:
        _check_range(x)
        return
    with pytest.raises(ApiError) as refused:
        _check_range(x)
    assert refused.value.status_code == 400
    assert str(refused.value) == f"inputs must be pixel values in [0, 1]; {refusal}"


def test_an_upload_is_named_by_its_place_and_its_file_name() -> None:
    assert _which(Upload(None, b""), 0) == "file 1"
    assert _which(Upload("", b""), 1) == "file 2"
    assert _which(Upload("a.jpg", b""), 2) == "file 3 ('a.jpg')"
    assert _which(Upload("x" * 150, b""), 0) == f"file 1 ({'x' * 100!r})"


def classifier(**options) -> Classifier:
    return Classifier(None, None, ImageLimits(max_bytes=1000), max_instances=8, timeout_s=1.0, **options)


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_refused_upload_says_which_file_and_why_with_the_api_s_limits() -> None:
    c = classifier()
    assert c._decode(Upload("ok.png", png()), 0).array.shape == (224, 224, 3)
    cases = [
        (Upload("big.png", png((200, 200)) + b"\0" * 1000), PayloadTooLarge, "file 1 ('big.png'): the file is "),
        (
            Upload("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n"),
            UnsupportedMediaType,
            "file 1 ('x.eps'): this file's format (EPS",
        ),
        (Upload(None, b""), InvalidImage, "file 1: the file is empty"),
    ]
    for upload, error, message in cases:
        with pytest.raises(error) as refused:
            c._decode(upload, 0)
        assert str(refused.value).startswith(message), str(refused.value)
    with pytest.raises(PayloadTooLarge, match=r"the limit is 1000$"):
        c._decode(Upload("big.png", png((200, 200)) + b"\0" * 1000), 0)


async def test_a_refused_decode_holds_nothing_of_the_decode() -> None:
    """The error a refused upload raises keeps no frame of the decode alive (its pixels, Pillow's buffers), nor
    the image error it replaced: they are freed before the decode's turn passes to the next upload."""
    c = classifier()
    for upload in (Upload("big.png", png((200, 200)) + b"\0" * 1000), Upload(None, b"not an image")):
        with pytest.raises(ApiError) as refused:
            await c._decode_in_turn(upload, 0)
        error = refused.value
        assert error.__context__ is None and error.__cause__ is None
        frames = []
        tb = error.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_globals["__name__"])
            tb = tb.tb_next
        assert not any(name.startswith("shared.") for name in frames), frames


def test_only_refusals_lose_their_traceback() -> None:
    """A bug is not a refusal: its traceback stays, for the log."""

    def broken(x: int) -> int:
        return 1 // x

    with pytest.raises(ZeroDivisionError) as failed:
        refused_bare(broken, 0)
    assert failed.traceback[-1].name == "broken"
    assert refused_bare(broken, x=1) == 1


class Trimmer:
    threshold_bytes = 12345

    def __init__(self) -> None:
        self.noted: list[int] = []

    def note(self, nbytes: int) -> None:
        self.noted.append(nbytes)


async def test_a_decode_waits_for_a_turn_and_gives_up_at_its_deadline() -> None:
    trimmer = Trimmer()
    c = classifier(decode_concurrency=1, decode_timeout_s=0.05, trimmer=trimmer)
    await c._decode_turns.acquire()  # every turn taken
    with pytest.raises(Timeout) as refused:
        await c._decode_in_turn(Upload("a.png", png()), 0)
    assert str(refused.value) == "file 1 ('a.png'): not decoded within 0.05 s (busy)"
    c._decode_turns.release()

    def slow_decode(upload: Upload, index: int):
        time.sleep(0.5)  # ten times the deadline
        return "decoded"

    c._decode = slow_decode
    with pytest.raises(Timeout) as refused:
        await c._decode_in_turn(Upload(None, png()), 1)
    assert str(refused.value) == "file 2: not decoded within 0.05 s"
    assert c._decode_turns.locked()  # the turn is held while the thread still decodes...
    await asyncio.wait_for(c._decode_turns.acquire(), 5.0)
    c._decode_turns.release()
    assert trimmer.noted == [12345]  # ...and given back once it is done, the trimmer told
    c.decode_timeout_s = 5.0
    assert await c._decode_in_turn(Upload(None, png()), 0) == "decoded"


class Batcher:
    """The batcher's seam: answers every image with the rows it is given, from ``model``."""

    def __init__(self, m: LoadedModel, row: list[float]) -> None:
        self.model, self.row = m, np.array(row, np.float32)

    async def predict(self, x: np.ndarray):
        return np.tile(self.row, (len(x), 1)), self.model


class Log:
    """The prediction log's seam: keeps uploads; remembers what it was told."""

    stores_uploads = True

    def __init__(self) -> None:
        self.expected: list[str] = []
        self.records: list = []

    def expect(self, prediction_id: str) -> None:
        self.expected.append(prediction_id)

    def forget(self, prediction_id: str) -> None:
        self.expected.remove(prediction_id)

    def record(self, record) -> None:
        self.records.append(record)


class Quota:
    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def allow(self, client: str, size: int) -> bool:
        self.asked.append((client, size))
        return len(self.asked) == 1  # the first upload only


async def test_classify_answers_records_and_keeps_uploads_within_the_quota() -> None:
    from services.api.metrics import ApiMetrics

    metrics, log, quota = ApiMetrics(), Log(), Quota()
    m = model(domain=0.5, outputs=Outputs(distance=2))
    c = Classifier(Batcher(m, [0.3, 0.7, 0.9]), metrics, ImageLimits(), 8, 5.0, predlog=log, keep=quota,
                   low_confidence=0.8)  # fmt: skip
    uploads = [Upload("a.png", png()), Upload("b.png", png((20, 20)))]
    before = time.perf_counter()
    answers = await c.classify(uploads, started=before - 100.0)
    elapsed_ms = (time.perf_counter() - before) * 1000
    await c.drain()
    assert [a["label"] for a in answers] == ["grass", "grass"] and answers[0]["confidence"] == pytest.approx(0.7)
    assert answers[0]["low_confidence"] is True  # 0.7 < the API's 0.8 (the model has no point of its own)
    assert answers[0]["in_domain"] is False and answers[0]["out_of_domain_reason"] == "unlike_training_photos"
    assert answers[0]["probabilities"] == pytest.approx({"dandelion": 0.3, "grass": 0.7})
    assert answers[1]["filename"] == "b.png" and "explain" not in answers[0]  # no map unless asked
    assert quota.asked == [("unknown", len(uploads[0].data)), ("unknown", len(uploads[1].data))]
    by_id = {r.id: r for r in log.records}
    assert sorted(by_id) == sorted(log.expected) == sorted(a["id"] for a in answers)
    first, second = (by_id[a["id"]] for a in answers)
    assert (first.endpoint, first.image, first.image_format) == ("predict", uploads[0].data, "PNG")
    assert second.image is None  # over the quota: answered, logged, not kept
    assert 100_000 <= first.latency_ms <= 100_000 + elapsed_ms  # from the request's start
    dropped = metrics.registry.get_sample_value("prediction_log_uploads_dropped_total", {"reason": "quota"})
    assert dropped == 1.0
    out = metrics.registry.get_sample_value("model_out_of_domain_total", {"version": "1"})
    assert out == 2.0


async def test_the_answer_follows_the_model_s_own_class_order_and_its_not_sure_point() -> None:
    """A model whose columns are (grass, dandelion) is answered in its order, not in the default one; 0.75 at a
    "not sure" point of 0.75 is sure (strictly below is not)."""
    from dataclasses import replace

    from services.api.metrics import ApiMetrics

    metrics, log = ApiMetrics(), Log()
    log.stores_uploads = False
    inverted = replace(model(domain=None), labels=("grass", "dandelion"))
    c = Classifier(Batcher(inverted, [0.25, 0.75]), metrics, ImageLimits(), 8, 5.0, predlog=log, low_confidence=0.75)
    (answer,) = await c.classify([Upload("a.png", png())])  # no start given: timed from here
    await c.drain()
    assert (answer["label"], answer["confidence"], answer["low_confidence"]) == ("dandelion", 0.75, False)
    assert answer["in_domain"] is None and answer["probabilities"] == {"grass": 0.25, "dandelion": 0.75}
    assert log.records[0].image is None and 0 <= log.records[0].latency_ms < 60_000  # not kept: the log says so
    assert metrics.registry.get_sample_value("model_out_of_domain_total", {"version": "1"}) is None  # no score
    await c.invocations(b'{"inputs": ' + str(np.full((1, 224, 224, 3), 0.5).tolist()).encode() + b"}")
    await c.drain()
    assert (log.records[-1].endpoint, log.records[-1].label) == ("invocations", "dandelion")


async def test_invocations_answers_in_mlflow_s_shape_and_records_each_input() -> None:
    import orjson

    from services.api.metrics import ApiMetrics

    metrics, log = ApiMetrics(), Log()
    m = model(domain=0.5, outputs=Outputs(distance=2))
    c = Classifier(Batcher(m, [0.8, 0.2, 0.7]), metrics, ImageLimits(), 8, 5.0, predlog=log)
    body = orjson.dumps({"inputs": np.full((2, 224, 224, 3), 0.5, np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
    before = time.perf_counter()
    out, answered, ids, flags = await c.invocations(body, started=before - 100.0)
    elapsed_ms = (time.perf_counter() - before) * 1000
    await c.drain()
    assert orjson.loads(out) == {"predictions": [[pytest.approx(0.8), pytest.approx(0.2)]] * 2}
    assert answered is m and flags == [False, False] and len(set(ids)) == 2
    assert [r.id for r in log.records] == ids and sorted(log.expected) == sorted(ids)
    record = log.records[0]
    assert (record.endpoint, record.model_name, record.model_version, record.label) == (
        "invocations",
        "m",
        "1",
        "dandelion",
    )
    assert record.confidence == pytest.approx(0.8) and record.image is None and record.image_format is None
    assert record.domain_distance == pytest.approx(0.7) and record.in_domain is False
    assert record.descriptors["rgb_r_mean"] == pytest.approx(0.5, abs=1 / 255)  # the input, described
    assert 100_000 <= record.latency_ms <= 100_000 + elapsed_ms
    assert metrics.registry.get_sample_value("model_predictions_total", {"label": "dandelion"}) == 2.0
    assert metrics.registry.get_sample_value("model_out_of_domain_total", {"version": "1"}) == 2.0
    await c.invocations(body)  # no start given: timed from here
    await c.drain()
    assert 0 <= log.records[-1].latency_ms < 60_000
    with pytest.raises(ApiError, match="must be a non-empty array of numbers"):  # a small body: parsed in place
        await c.invocations(b'{"inputs": []}')


async def test_inputs_that_cannot_be_described_are_answered_and_let_go(monkeypatch, caplog) -> None:
    """Monitoring never fails a request: the answer stands, the error is logged, and the log is told to stop
    waiting for those ids (feedback for them would wait for a row that never comes)."""
    import orjson

    from services.api import service
    from services.api.metrics import ApiMetrics

    def broken(image):
        raise RuntimeError("no descriptors today")

    monkeypatch.setattr(service, "describe_array", broken)
    log = Log()
    c = Classifier(Batcher(model(domain=None), [0.8, 0.2]), ApiMetrics(), ImageLimits(), 8, 5.0, predlog=log)
    body = orjson.dumps({"inputs": np.full((2, 224, 224, 3), 0.5, np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
    out, _, ids, flags = await c.invocations(body)
    assert len(ids) == 2
    await c.drain()
    assert orjson.loads(out)["predictions"][0] == [pytest.approx(0.8), pytest.approx(0.2)] and flags is None
    assert log.records == [] and log.expected == []  # announced, then forgotten: both ids
    said = [r.getMessage() for r in caplog.records if r.name == "services.api.service"]
    assert said == ["describing 2 inputs failed; they are not logged"]


class SlowBatcher(Batcher):
    async def predict(self, x: np.ndarray):
        await asyncio.sleep(1.0)
        return await super().predict(x)


async def test_a_model_that_is_late_or_answers_nan_is_refused_with_the_reason() -> None:
    from services.api.metrics import ApiMetrics

    x = np.full((1, 224, 224, 3), 0.5, np.float32)
    late = Classifier(SlowBatcher(model(domain=None), [0.8, 0.2]), ApiMetrics(), ImageLimits(), 8, 0.05)
    with pytest.raises(Timeout) as refused:
        await late._predict(x)
    assert str(refused.value) == "the model did not answer within 0.05 s"
    nan = Classifier(Batcher(model(domain=None), [np.nan, 0.2]), ApiMetrics(), ImageLimits(), 8, 5.0)
    with pytest.raises(ApiError) as refused:
        await nan._predict(x)
    assert (refused.value.status_code, str(refused.value)) == (
        400, "the model's output is not a number for this input: send pixel values in [0, 1]"
    )  # fmt: skip
