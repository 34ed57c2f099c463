"""The versioned serialised form of TrialSettings (FrozenConfig): round trip, refusal of
another version, and version-less dicts (older runs, study files) read as the current one."""

import json

import pytest

from binarydm import BinaryDMConfig
from binarydm._typed import VERSION_KEY, ConfigError
from binarydm.train.settings import TrialSettings


def test_trial_settings_json_carries_its_version_and_round_trips():
    settings = TrialSettings().replace(**{"training.steps": 40, "method.lrm.rank_divisor": 8})
    text = settings.to_json()
    assert json.loads(text)[VERSION_KEY] == TrialSettings.CONFIG_VERSION == 1
    assert TrialSettings.from_json(text) == settings
    # Nested configs carry no version of their own in the settings' form: one key per document.
    assert VERSION_KEY not in json.loads(text)["method"]


def test_a_dict_without_a_version_is_the_current_version():
    settings = TrialSettings().replace(**{"seed": 3})
    assert TrialSettings.from_dict(settings.to_dict()) == settings


def test_another_version_is_refused_with_the_class_named():
    data = {**TrialSettings().to_versioned_dict(), VERSION_KEY: 2}
    with pytest.raises(ConfigError, match=r"TrialSettings\.config_version=2 is invalid: allowed 1"):
        TrialSettings.from_dict(data)


def test_versions_are_per_class_and_stay_out_of_the_logged_params():
    assert BinaryDMConfig.CONFIG_VERSION == 2
    assert BinaryDMConfig.from_json(BinaryDMConfig().to_json()) == BinaryDMConfig()
    assert VERSION_KEY not in TrialSettings().flat()
    assert not any(key.endswith(VERSION_KEY) for key in TrialSettings().flat())
