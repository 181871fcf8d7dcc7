"""A forecaster with an adaptive band width (``forecast.adaptive_width_gamma``, ``service/core/intervals.py``): a
session forecasts at every row it observes, keeps its last ``horizon`` forecasts, scores each new row against all
of them and moves one width per target column. Checked against a reference written here from the definition (one
forecast per row, a plain loop over the forecasts a row reveals), on every session store; the band does not depend
on how the rows are chunked; it survives export and import; the release's evaluation
(``training.evaluate.adaptive_quantiles``) gives the very quantiles the sessions return."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.dataplane import CoreDataPlane
from service.core.intervals import WidthRule
from service.core.manifest import MANIFEST_FILE, Manifest
from service.core.tasks.forecast import ForecastTask
from service.core.types import ModelRef, SequenceRef
from service.errors import FailedPrecondition, InvalidInput
from tests.service.core.conftest import MakeDP
from tests.service.core.test_forecast_scale import FEATURES, HORIZON, SCALED, WINDOW, history_tensor, series

GAMMA = 0.05
ADAPTIVE, ADAPTIVE_PLAIN = ModelRef("adaptive"), ModelRef("adaptive-plain")


def _copy(src: Path, dst: Path, gamma: float | None, offsets_times: float = 1.0) -> None:
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST_FILE).read_text())
    raw["name"] = dst.parent.name
    raw["forecast"]["adaptive_width_gamma"] = gamma
    raw["forecast"]["quantile_offsets"] = (np.asarray(raw["forecast"]["quantile_offsets"]) * offsets_times).tolist()
    (dst / MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def adaptive_repo(scaled_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scaled/1`` and ``plain/1`` (conftest.scaled_repo) as they are, and with an adaptive width: ``adaptive/1``
    (scale output) and ``adaptive-plain/1`` (constant offsets); ``wide/1`` and ``narrow/1``: ``adaptive/1`` with
    offsets x 20 and x 0.02, bands that cover nearly everything and nearly nothing."""
    root = tmp_path_factory.mktemp("adaptive-models")
    for name in ("scaled", "plain"):
        shutil.copytree(scaled_repo / name, root / name)
    _copy(scaled_repo / "scaled" / "1", root / "adaptive" / "1", GAMMA)
    _copy(scaled_repo / "plain" / "1", root / "adaptive-plain" / "1", GAMMA)
    _copy(scaled_repo / "scaled" / "1", root / "wide" / "1", GAMMA, offsets_times=20.0)
    _copy(scaled_repo / "scaled" / "1", root / "narrow" / "1", GAMMA, offsets_times=0.02)
    return root


def reference(dp: CoreDataPlane, model: ModelRef, history: np.ndarray) -> list[np.ndarray]:
    """The quantiles (original units) a session must return at each row from the window-th on, computed from the
    definition: forecast from every window with ONNX Runtime; before each forecast, the row just observed is scored
    against each of the last ``horizon`` forecasts (forecast j issued r rows ago: its step r - 1), and each target
    column's width m becomes m * exp(-gamma * (share inside p10-p90 - 0.8)); a forecast's band uses the m of the
    row it was issued on."""
    entry = dp.registry.resolve(model)
    m, task = entry.manifest, entry.task
    assert m.forecast is not None and m.normalization is not None and isinstance(task, ForecastTask)
    mean, std = np.asarray(m.normalization.mean, np.float32), np.asarray(m.normalization.std, np.float32)
    off = np.asarray(m.forecast.quantile_offsets, np.float64)  # (3, H, T)
    gamma = m.forecast.adaptive_width_gamma
    assert gamma is not None
    z = (history - mean) / std
    issued: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (point, scale, width) per forecast, z-scored
    width = np.ones(FEATURES)
    out = []
    for end in range(WINDOW, len(history) + 1):  # the forecast from rows [end - WINDOW, end)
        if issued:
            y = z[end - 1]
            inside = np.zeros(FEATURES)
            recent = issued[-HORIZON:]
            for age, (p, s, w) in enumerate(reversed(recent), start=1):
                step = age - 1
                band = [p[step] + (off[1, step] + w * (off[k, step] - off[1, step])) * s[0] for k in (0, 2)]
                inside += (y >= band[0]) & (y <= band[1])
            width = width * np.exp(-gamma * (inside / len(recent) - 0.8))
        run = entry.runtime.run({"history": z[end - WINDOW : end][None].astype(np.float32)}, 1)
        point = run["forecast"][0].astype(np.float64)
        scale = run["scale"][0].astype(np.float64) if "scale" in run else np.ones((1, FEATURES))
        issued.append((point, scale, width.copy()))
        q = point[None] + (off[1][None] + width * (off - off[1][None])) * scale[None]
        out.append(q * std + mean)
    return out


def want_point(dp: CoreDataPlane, model: ModelRef, history: np.ndarray) -> np.ndarray:
    entry = dp.registry.resolve(model)
    assert entry.manifest.normalization is not None
    mean = np.asarray(entry.manifest.normalization.mean, np.float32)
    std = np.asarray(entry.manifest.normalization.std, np.float32)
    run = entry.runtime.run({"history": ((history[-WINDOW:] - mean) / std)[None].astype(np.float32)}, 1)
    out: np.ndarray = run["forecast"][0] * std + mean
    return out


@pytest.mark.parametrize("model", [ADAPTIVE, ADAPTIVE_PLAIN], ids=["scaled", "constant"])
async def test_a_session_band_moves_as_the_definition_says(
    adaptive_repo: Path, make_dp: MakeDP, model: ModelRef
) -> None:
    dp = await make_dp(models=adaptive_repo)
    history = np.concatenate([series(60, volatility=1.0, seed=1), series(50, volatility=3.0, seed=2)])
    want = reference(dp, model, history)
    s = await dp.create_session(model)
    warm = await dp.observe(s.id, history[: WINDOW - 1])
    assert warm.point.shape == (0, FEATURES) and warm.rows_seen == WINDOW - 1
    got = [(await dp.observe(s.id, history[end - 1 : end])).quantiles for end in range(WINDOW, len(history) + 1)]
    assert len(got) == len(want) == len(history) - WINDOW + 1
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4, err_msg=f"forecast {k}")
    widths = (want[-1][2] - want[-1][0]) / (want[0][2] - want[0][0])  # the band has moved: the test can tell
    assert np.abs(np.log(widths)).max() > 0.05
    stateless = await dp.forecast(model, history)  # no session: the same point, the calibrated band (width 1)
    last = await dp.observe(s.id, history[-1:])  # (the last row again: a new window, forecast at the new width)
    assert stateless.point.shape == last.point.shape
    np.testing.assert_allclose(stateless.point, want_point(dp, model, history), rtol=1e-5, atol=1e-5)
    assert not np.allclose(stateless.quantiles, got[-1], atol=1e-3)


async def test_the_band_does_not_depend_on_how_the_rows_are_chunked(adaptive_repo: Path, make_dp: MakeDP) -> None:
    # A 40-row Observe runs its forecasts in parts, and moves its width in a worker thread (ADVANCE_INLINE_ROWS)
    dp = await make_dp(models=adaptive_repo, max_batch_size=16)
    history = series(120, volatility=2.0, seed=6)
    one = await dp.create_session(ADAPTIVE)
    for r in range(len(history)):
        last_one = await dp.observe(one.id, history[r : r + 1])
    chunked = await dp.create_session(ADAPTIVE)
    for a, b in ((0, 10), (10, 30), (30, 31), (31, 71), (71, 120)):
        last_chunk = await dp.observe(chunked.id, history[a:b])
    np.testing.assert_allclose(last_chunk.quantiles, last_one.quantiles, rtol=1e-5, atol=1e-5)
    assert last_chunk.rows_seen == last_one.rows_seen == 120
    sa, sb = await dp.sessions.get(one.id), await dp.sessions.get(chunked.id)
    assert set(sa.context) == set(sb.context) == {"rows", "ring_z", "ring_width", "ring_scale"}
    assert len(sa.context["ring_z"]) == HORIZON
    for key in sa.context:
        np.testing.assert_allclose(sa.context[key], sb.context[key], rtol=1e-5, atol=1e-6, err_msg=key)


async def test_live_counters_score_each_row_against_every_forecast_of_it_however_the_rows_come(
    adaptive_repo: Path, make_dp: MakeDP
) -> None:
    """``seqserve_forecast_*`` counters: with an adaptive width each observed row is counted against every forecast
    the session issued for it (the last ``horizon`` ones, each at its own step): the all-steps coverage the width
    steers, the same for a row-by-row feed and a chunked one. Expected counts from the quantiles the server
    returned."""
    from tests.service.core.test_forecast_coverage import counts

    history = series(WINDOW + 40, volatility=1.5, seed=12)
    one = await make_dp(models=adaptive_repo)
    s = await one.create_session(ADAPTIVE)
    await one.observe(s.id, history[: WINDOW - 1])
    issued = [(await one.observe(s.id, history[e - 1 : e])).quantiles for e in range(WINDOW, len(history) + 1)]
    n, below = 0, [0, 0, 0]
    for r in range(WINDOW, len(history)):  # row r; forecast k was issued on row WINDOW - 1 + k
        for k in range(max(0, r - WINDOW - HORIZON + 1), r - WINDOW + 1):
            step = r - (WINDOW - 1 + k) - 1
            n += FEATURES
            below = [b + int((history[r] <= q[step]).sum()) for b, q in zip(below, issued[k], strict=True)]
    assert n == FEATURES * sum(min(HORIZON, r - WINDOW + 1) for r in range(WINDOW, len(history)))
    assert counts(one, ADAPTIVE.name) == (n, below)
    chunked = await make_dp(models=adaptive_repo)
    c = await chunked.create_session(ADAPTIVE)
    for a, b in ((0, 5), (5, 30), (30, 31), (31, len(history))):
        await chunked.observe(c.id, history[a:b])
    assert counts(chunked, ADAPTIVE.name) == (n, below)


@pytest.mark.parametrize(("name", "direction"), [("wide", -1), ("narrow", 1)])
async def test_a_band_that_covers_too_much_narrows_and_one_that_covers_too_little_widens(
    adaptive_repo: Path, make_dp: MakeDP, name: str, direction: int
) -> None:
    dp = await make_dp(models=adaptive_repo)
    history = series(WINDOW + 60, volatility=1.0, seed=9)
    s = await dp.create_session(ModelRef(name))
    await dp.observe(s.id, history[:WINDOW])
    await dp.observe(s.id, history[WINDOW:])
    width = (await dp.sessions.get(s.id)).context["ring_width"][-1]  # the session's width: its last forecast's
    # 60 rows, each moving m by exp(-0.05 * (share - 0.8)): the share is ~1 (wide) or ~0 (narrow)
    assert (np.sign(np.log(width)) == direction).all(), width
    assert (np.abs(np.log(width)) > 0.5).all(), width
    stateless = (await dp.forecast(ModelRef(name), history)).quantiles
    observed = (await dp.observe(s.id, history[-1:])).quantiles
    ratio = (observed[2] - observed[0]) / (stateless[2] - stateless[0])
    assert ((ratio < 1) if direction < 0 else (ratio > 1)).all()


async def test_a_session_reserves_room_for_its_ring_and_keeps_it_through_export(
    adaptive_repo: Path, make_dp: MakeDP
) -> None:
    dp = await make_dp(models=adaptive_repo, session_signing_key="s" * 40)
    task = dp.registry.resolve(ADAPTIVE).task
    assert task.config_parameters()["adaptive_width_gamma"] == "0.05"
    assert "adaptive_width_gamma" not in dp.registry.resolve(SCALED).task.config_parameters()
    t = FEATURES
    assert task.session_nbytes() == 4 * (WINDOW * FEATURES + HORIZON * (HORIZON + 1 + 1) * t)
    history = series(WINDOW + HORIZON + 30, volatility=1.5, seed=3)
    s = await dp.create_session(ADAPTIVE)
    await dp.observe(s.id, history[:-10])
    kept = await dp.sessions.get(s.id)
    assert sum(a.nbytes for a in kept.context.values()) == task.session_nbytes()  # the ring is full
    blob, _ = await dp.export_session(s.id)
    copy = await dp.import_session(blob)
    a = await dp.observe(s.id, history[-10:])
    b = await dp.observe(copy.id, history[-10:])
    np.testing.assert_array_equal(a.quantiles, b.quantiles)


async def test_an_imported_session_whose_ring_does_not_hang_together_is_refused(
    adaptive_repo: Path, make_dp: MakeDP
) -> None:
    """A signed blob (another build sharing the key) whose arrays each have an allowed shape but do not agree:
    FAILED_PRECONDITION at import, naming the problem, instead of a session whose next Observe fails."""
    from service.core.sessions.export import seal, unseal

    key = "s" * 40
    dp = await make_dp(models=adaptive_repo, session_signing_key=key)
    history = series(WINDOW + 5, volatility=1.0, seed=13)
    s = await dp.create_session(ADAPTIVE)
    await dp.observe(s.id, history)  # 6 forecasts, fewer than the horizon: one more still has an allowed shape
    blob, _ = await dp.export_session(s.id)

    def edited(change: Any) -> bytes:
        x = unseal(blob, key.encode())
        change(x.session.context)
        return seal(x.session, key.encode(), x.exported_at)

    cases = {
        "its ring's arrays hold different numbers of forecasts": lambda c: c.update(ring_width=c["ring_width"][:3]),
        "it holds ring_scale, ring_z without ring_width": lambda c: c.pop("ring_width"),
        "a width is not positive": lambda c: c.update(ring_width=-c["ring_width"]),
        f"it holds 7 forecasts after {WINDOW + 5} rows with a window of {WINDOW}": lambda c: c.update(
            ring_z=np.concatenate([c["ring_z"][:1], c["ring_z"]]),
            ring_width=np.concatenate([c["ring_width"][:1], c["ring_width"]]),
            ring_scale=np.concatenate([c["ring_scale"][:1], c["ring_scale"]]),
        ),
    }
    for problem, change in cases.items():
        with pytest.raises(FailedPrecondition, match="context does not fit model") as err:
            await dp.import_session(edited(change))
        assert problem in str(err.value), err.value
    copy = await dp.import_session(blob)  # the untouched blob imports and continues
    assert (await dp.observe(copy.id, history[-1:])).point.shape == (HORIZON, FEATURES)


async def test_a_refused_or_cancelled_observe_leaves_the_ring_and_the_width_as_they_were(
    adaptive_repo: Path, make_dp: MakeDP
) -> None:
    dp = await make_dp(models=adaptive_repo)
    history = series(WINDOW + 80, volatility=1.0, seed=14)
    s = await dp.create_session(ADAPTIVE)
    await dp.observe(s.id, history[: WINDOW + 10])
    before = dict((await dp.sessions.get(s.id)).context)
    bad = history[WINDOW + 10 :].copy()
    bad[5, 2] = np.nan
    with pytest.raises(InvalidInput, match=r"rows\[5\]\[2\]"):
        await dp.observe(s.id, bad)
    task = asyncio.ensure_future(dp.observe(s.id, history[WINDOW + 10 :]))  # 70 rows: a worker-thread advance
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = (await dp.sessions.get(s.id)).context
    assert set(after) == set(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    got = await dp.observe(s.id, history[WINDOW + 10 :])
    fresh = await dp.create_session(ADAPTIVE)
    want = await dp.observe(fresh.id, history)
    np.testing.assert_allclose(got.quantiles, want.quantiles, rtol=1e-5, atol=1e-5)  # (batches differ)


async def test_kserve_sequences_move_the_width_as_sessions_do(adaptive_repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=adaptive_repo)
    history = series(WINDOW + 40, volatility=1.0, seed=4)
    s = await dp.create_session(ADAPTIVE)
    await dp.observe(s.id, history[: WINDOW + 20])
    want = await dp.observe(s.id, history[WINDOW + 20 :])

    await dp.infer(ADAPTIVE, history_tensor(history[: WINDOW + 20]), sequence=SequenceRef(id="w-1", start=True))
    last = await dp.infer(ADAPTIVE, history_tensor(history[WINDOW + 20 :]), sequence=SequenceRef(id="w-1", end=True))
    quantiles = {o.name: o.array for o in last.outputs}["QUANTILES"]
    assert quantiles is not None
    np.testing.assert_allclose(quantiles, want.quantiles, atol=1e-5)


async def test_the_release_evaluation_replays_what_sessions_return(adaptive_repo: Path, make_dp: MakeDP) -> None:
    """``training.evaluate.adaptive_quantiles``, which the model card's test coverage comes from, on the same rows:
    the quantiles each session forecast returned, window by window."""
    from training.evaluate import adaptive_quantiles

    dp = await make_dp(models=adaptive_repo)
    entry = dp.registry.resolve(ADAPTIVE)
    m = entry.manifest
    assert m.normalization is not None
    mean, std = np.asarray(m.normalization.mean, np.float32), np.asarray(m.normalization.std, np.float32)
    history = series(WINDOW + 50, volatility=2.0, seed=8)
    z = ((history - mean) / std).astype(np.float32)
    x = np.stack([z[e - WINDOW : e] for e in range(WINDOW, len(z) + 1)])  # every window, in time order
    run = entry.runtime.run({"history": x}, len(x))
    quant_z, _ = adaptive_quantiles(m, x[:, -1], run["forecast"], run["scale"])
    s = await dp.create_session(ADAPTIVE)
    await dp.observe(s.id, history[: WINDOW - 1])
    for k, end in enumerate(range(WINDOW, len(history) + 1)):
        got = (await dp.observe(s.id, history[end - 1 : end])).quantiles
        np.testing.assert_allclose(got, quant_z[:, k] * std + mean, rtol=1e-5, atol=1e-5, err_msg=f"window {k}")


def _edited(manifest: Manifest, **forecast: Any) -> Manifest:
    raw = json.loads(manifest.model_dump_json())
    raw["forecast"].update(forecast)
    return Manifest.model_validate(raw)


def test_check_refuses_an_adaptive_width_it_cannot_apply(adaptive_repo: Path) -> None:
    m = Manifest.load(adaptive_repo / "adaptive" / "1" / MANIFEST_FILE)
    ForecastTask.check(m)
    off = np.asarray(m.forecast.quantile_offsets if m.forecast else [])
    with pytest.raises(ValueError, match=r"adaptive_width_gamma is set but forecast\.quantile_offsets is empty"):
        ForecastTask.check(_edited(m, quantile_offsets=[], scale_output=None))
    with pytest.raises(ValueError, match=r"odd number of levels with 0\.5 in the middle; got levels \[0\.1, 0\.9\]"):
        ForecastTask.check(_edited(m, quantiles=[0.1, 0.9], quantile_offsets=off[[0, 2]].tolist()))
    with pytest.raises(ValueError, match="adaptive_width_gamma"):
        _edited(m, adaptive_width_gamma=0.0)  # the manifest's schema: 0 < gamma <= 1
    with pytest.raises(ValueError, match="adaptive_width_gamma"):
        _edited(m, adaptive_width_gamma=2.0)


def test_the_width_stays_within_its_limits() -> None:
    rule = WidthRule(np.stack([-np.ones((2, 1)), np.zeros((2, 1)), np.ones((2, 1))]), [0.1, 0.5, 0.9], 1.0)
    m = rule.ones()
    for _ in range(10):
        m = rule.updated(m, np.ones(1, np.float32))
    assert m[0] == pytest.approx(np.exp(-0.2 * 10), rel=1e-5)
    for _ in range(100):
        m = rule.updated(m, np.ones(1, np.float32))
    assert m[0] == pytest.approx(0.01)
    for _ in range(1000):
        m = rule.updated(m, np.zeros(1, np.float32))
    assert m[0] == pytest.approx(100.0)
