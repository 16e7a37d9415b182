"""The general annealing schedule against the closed forms of every law and unit."""

import math

import pytest

from qlight.callbacks.schedules import AQE_R0, AQE_R1, AQE_R2, EDE_T, Schedule


@pytest.mark.parametrize("unit", ["epoch", "step"])
@pytest.mark.parametrize(
    ("schedule", "t", "expected"),
    [
        (Schedule(law="constant", start=0.5), 0, 0.5),
        (Schedule(law="constant", start=0.5), 1000, 0.5),
        # linear: start + (end - start) * min(t / ramp, 1)
        (Schedule(law="linear", start=0.5, end=1.0, ramp=100), 0, 0.5),
        (Schedule(law="linear", start=0.5, end=1.0, ramp=100), 25, 0.625),
        (Schedule(law="linear", start=0.5, end=1.0, ramp=100), 100, 1.0),
        (Schedule(law="linear", start=0.5, end=1.0, ramp=100), 150, 1.0),
        (Schedule(law="linear", start=2.0, end=0.0, ramp=4), 1, 1.5),
        # geometric: start * (end / start) ** min(t / ramp, 1)
        (Schedule(law="geometric", start=0.1, end=10.0, ramp=4), 1, 0.1 * 100**0.25),
        (Schedule(law="geometric", start=0.1, end=10.0, ramp=4), 2, 1.0),
        (Schedule(law="geometric", start=0.1, end=10.0, ramp=4), 9, 10.0),
        # exponential: end - (end - start) * gamma ** t
        (Schedule(law="exponential", start=0.5, end=1.0, gamma=0.5), 3, 1.0 - 0.5 * 0.125),
        # step: start + inc * floor(t / every), capped at end
        (Schedule(law="step", start=1.0, end=41.0, inc=20.0, every=40), 39, 1.0),
        (Schedule(law="step", start=1.0, end=41.0, inc=20.0, every=40), 40, 21.0),
        (Schedule(law="step", start=1.0, end=41.0, inc=20.0, every=40), 500, 41.0),
        (Schedule(law="step", start=1.0, end=0.2, inc=-0.25, every=2), 5, 0.5),
        (Schedule(law="step", start=1.0, end=0.2, inc=-0.25, every=2), 99, 0.2),
    ],
)
def test_laws_closed_form(schedule: Schedule, t: int, expected: float, unit: str) -> None:
    """Every law at given t, counted in epochs or steps; the other counter must not matter."""
    s = Schedule(**{**schedule.__dict__, "unit": unit})
    value = s.value(epoch=t, step=12345) if unit == "epoch" else s.value(epoch=777, step=t)
    assert value == pytest.approx(expected, rel=1e-12)


def test_epoch_unit_holds_value_within_epoch() -> None:
    s = AQE_R1
    assert {s.value(epoch=7, step=k) for k in range(0, 5000, 97)} == {0.5 + 0.5 * 7 / 100}


def test_step_unit_moves_every_step() -> None:
    s = Schedule(law="linear", start=0.0, end=1.0, ramp=10, unit="step")
    assert [s.value(epoch=0, step=k) for k in range(12)] == pytest.approx([k / 10 for k in range(11)] + [1.0])


def test_ramp_none_uses_run_length() -> None:
    s = Schedule(law="linear", start=0.0, end=1.0, ramp=None)
    assert s.value(3, 0, total=12) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="run length"):
        s.value(3, 0)


def test_aqe_presets() -> None:
    """R0 constant 0.5; R1 min(1, 0.5 + 0.5 e / 100) per epoch; R2 1 - 0.5 * 0.988^e."""
    for e in (0, 5, 25, 55, 100, 199):
        assert AQE_R0.value(e, 0) == 0.5
        assert AQE_R1.value(e, 0) == pytest.approx(min(1.0, 0.5 + 0.5 * e / 100))
        assert AQE_R2.value(e, 0) == pytest.approx(1 - 0.5 * 0.988**e)
    # the figure read-outs of AQE.md §1.4 (0.51 / 0.63 / 0.78-0.83 at epochs 5 / 25 / 55) within ±0.03
    for e, seen in ((5, 0.51), (25, 0.63), (55, 0.80)):
        assert abs(AQE_R1.value(e, 0) - seen) <= 0.03


def test_ede_temperature_matches_irnet_formula() -> None:
    """t_e = 10^(log10 Tmin + (log10 Tmax - log10 Tmin) * e / E) with Tmin 0.1, Tmax 10, E = 200."""
    s = EDE_T
    for e in (0, 1, 50, 100, 199):
        expected = 10 ** (math.log10(0.1) + (math.log10(10) - math.log10(0.1)) * e / 200)
        assert s.value(e, 0, total=200) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"law": "cosine"}, "law='cosine'; valid"),
        ({"unit": "iter"}, "unit='iter'; valid"),
        ({"ramp": 0}, "ramp=0"),
        ({"law": "geometric", "start": 0.0}, "same sign"),
        ({"law": "exponential", "gamma": 1.5}, "gamma=1.5"),
        ({"law": "step", "every": 0}, "every=0"),
        ({"law": "step", "start": 0.0, "end": 1.0, "inc": -0.1}, "flip its sign"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)
