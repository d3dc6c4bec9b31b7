from dataclasses import dataclass
from typing import Literal

import pytest

from sparseforge.config import Config, dumps_toml, loads_toml, opt
from sparseforge.errors import ConfigError
from sparseforge.train import TrainConfig


@dataclass(frozen=True)
class Inner(Config):
    rho: float = opt(1e-3, min=0.0)


@dataclass(frozen=True)
class Demo(Config):
    name: str = "x"
    k: int = opt(8, choices=(4, 6, 8, 12))
    ratio: float | str = 3.6
    kind: Literal["a", "b"] = "a"
    xs: tuple[float, ...] = (0.5, 0.75)
    flag: bool = True
    inner: Inner = opt(factory=Inner)


def test_round_trip_toml():
    c = Demo(name='q"uote\n', k=12, ratio="3.6x", kind="b", xs=(1, 2.5), flag=False, inner=Inner(rho=0.5))
    text = c.to_toml()
    assert Demo.from_toml(text) == c
    assert isinstance(Demo.from_toml(text).xs[0], float)


def test_train_config_round_trip():
    c = TrainConfig(epochs=3, lr=0.02, milestones=(0.3, 0.6))
    assert TrainConfig.from_toml(c.to_toml()) == c


@pytest.mark.parametrize("kwargs,needle", [
    ({"k": 5}, "accepted values: 4, 6, 8, 12"),
    ({"kind": "c"}, "expected 'a' | 'b'"),
    ({"flag": 1}, "Demo.flag"),
    ({"xs": "0.5"}, "list of float"),
    ({"inner": {"rho": -1.0}}, "must be >= 0.0"),
    ({"inner": {"rhoo": 1.0}}, "did you mean 'rho'"),
])
def test_errors_name_field_and_fix(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        Demo.from_dict(kwargs)
    assert needle in str(e.value)


def test_unknown_field_suggests():
    with pytest.raises(ConfigError, match="unknown field 'epoch'.*did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


def test_bad_toml_syntax():
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_toml("epochs = = 3")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="data_dir"):
        TrainConfig(dataset="cifar10")
    with pytest.raises(ConfigError, match="milestones"):
        TrainConfig(milestones=(1.5,))


def test_frozen():
    c = TrainConfig()
    with pytest.raises(Exception):
        c.epochs = 3  # type: ignore[misc]


def test_dumps_arrays_of_tables():
    text = dumps_toml({"model": "r20", "stage": [{"method": "pattern", "k": 8}, {"method": "finetune", "opt": {"lr": 0.1}}]})
    assert loads_toml(text) == {"model": "r20", "stage": [{"method": "pattern", "k": 8}, {"method": "finetune", "opt": {"lr": 0.1}}]}


def test_atomic_writes_get_plain_file_permissions(tmp_path):
    """Checkpoints, models and reports are written through a temp file; they must still get the permissions a
    plain write gives (umask), or keep those of the file they replace - not the temp file's owner-only 0600."""
    import os
    import stat

    from sparseforge.utils import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
        os.chmod(tmp_path / "a.bin", 0o640)
        atomic_write_bytes(tmp_path / "a.bin", b"y")
        assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
        assert (tmp_path / "a.bin").read_bytes() == b"y"
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.bin", b"z")
        assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600
    finally:
        os.umask(old)
