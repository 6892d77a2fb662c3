"""Every option file in options/ builds its network through BasicSR's registry."""
import json
from pathlib import Path

import pytest
import yaml
from basicsr.archs import build_network

from conftest import reference_file

OPTIONS = Path(__file__).resolve().parents[1] / 'options'
EXPECTED_LAYOUT = {'archs/mfghmoe_x4.yml': 'official_mfghmoe_x4', 'archs/hat_x4.yml': 'hat_x4'}


@pytest.mark.parametrize('relative', sorted(EXPECTED_LAYOUT))
def test_network_blocks_build_the_published_layouts(relative: str) -> None:
    with open(OPTIONS / relative) as f:
        opt = yaml.safe_load(f)
    net = build_network(dict(opt['network_g']))
    with open(reference_file('state_dict_spec_full.json')) as f:
        spec = json.load(f)[EXPECTED_LAYOUT[relative]]
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == spec['keys']


def test_every_option_file_is_covered() -> None:
    found = {str(p.relative_to(OPTIONS)) for p in OPTIONS.rglob('*.yml')}
    assert found == set(EXPECTED_LAYOUT)
