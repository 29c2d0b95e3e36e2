import pytest

from support.serving import trained


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> a tiny trained checkpoint of that family, trained once per session."""
    made = {}
    steps = {"translation": 250, "classification": 20, "lm": 300, "vision": 20}

    def get(family):
        if family not in made:
            made[family] = trained(family, tmp_path_factory.mktemp(f"serve-{family}"), steps=steps[family])
        return made[family]

    return get
