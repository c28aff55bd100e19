"""The oneDNN primitive-cache capacity that tools' setup() asks for before the first convolution."""
from selftrain_d2.utils.onednn import CACHE_CAPACITY_ENV, set_primitive_cache_capacity


def test_capacity_is_set_in_the_environment_when_unset():
    environ = {}
    assert set_primitive_cache_capacity(4096, environ) == 4096
    assert environ == {CACHE_CAPACITY_ENV: "4096"}


def test_a_users_environment_value_wins():
    environ = {CACHE_CAPACITY_ENV: "512"}
    assert set_primitive_cache_capacity(4096, environ) == 512
    assert environ == {CACHE_CAPACITY_ENV: "512"}


def test_zero_keeps_onednns_default():
    environ = {}
    assert set_primitive_cache_capacity(0, environ) is None
    assert environ == {}

