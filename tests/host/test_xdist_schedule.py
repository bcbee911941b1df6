"""The rule tests/conftest.py gives pytest-xdist's scheduler: the files whose tests share a module-scoped fixture
(declared in the file or in a conftest.py above it) stay on one worker; the others are shared test by test."""
from pathlib import Path

from support.schedule import shares_module_fixtures, unit

TESTS = Path(__file__).resolve().parents[1]


def test_a_module_fixture_in_the_file_or_a_conftest_above_keeps_the_file_together(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "conftest.py").write_text('@pytest.fixture(scope="module")\ndef dev(): ...\n')
    (tmp_path / "a" / "b" / "test_x.py").write_text("def test_x(dev): ...\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "test_y.py").write_text("@pytest.fixture(scope = 'module')\ndef srv(): ...\n")
    (tmp_path / "c" / "test_z.py").write_text('@pytest.fixture(scope="session")\ndef srv(): ...\n')
    assert shares_module_fixtures(tmp_path / "a" / "b" / "test_x.py", tmp_path)
    assert shares_module_fixtures(tmp_path / "c" / "test_y.py", tmp_path)
    assert not shares_module_fixtures(tmp_path / "c" / "test_z.py", tmp_path)
    # a conftest.py above the root is not this suite's
    assert not shares_module_fixtures(tmp_path / "a" / "b" / "test_x.py", tmp_path / "a" / "b")


def test_the_suites_devices_stay_together_and_the_api_tests_spread():
    root = TESTS.parent
    assert shares_module_fixtures(TESTS / "devices" / "test_relays.py", root)  # device_factory, in devices/conftest
    assert shares_module_fixtures(TESTS / "controlplane" / "test_schemathesis.py", root)  # one server per backend
    assert not shares_module_fixtures(TESTS / "controlplane" / "test_state.py", root)
    assert not shares_module_fixtures(TESTS / "integration" / "test_it_state.py", root)


def test_a_parametrised_module_fixture_makes_a_unit_per_parameter(tmp_path):
    (tmp_path / "test_st.py").write_text('@pytest.fixture(scope="module", params=["sqlite", pytest.param("pg")])\n'
                                         'def live(request): ...\n')
    (tmp_path / "test_dev.py").write_text('@pytest.fixture(scope="module")\ndef dev(): ...\n')
    assert unit("test_st.py::test_a[sqlite]", tmp_path) == unit("test_st.py::test_b[sqlite]", tmp_path)
    assert unit("test_st.py::test_a[sqlite]", tmp_path) != unit("test_st.py::test_a[pg]", tmp_path)
    assert unit("test_dev.py::test_a[1]", tmp_path) == unit("test_dev.py::test_b[2]", tmp_path) == "test_dev.py"
    (tmp_path / "test_api.py").write_text("def test_a(): ...\n")
    assert unit("test_api.py::test_a", tmp_path) == "test_api.py::test_a"
