"""The command line's choices (hmoe_arch.commands.choices) are the implementing modules' own tables."""
from hmoe_arch.commands import choices


def test_choices_are_the_tables_of_the_modules_that_implement_them() -> None:
    from hmoe_arch.commands.export import FORMATS
    from hmoe_arch.commands.prepare import DATASETS
    from hmoe_arch.data.degradations import DEGRADATIONS
    from hmoe_arch.protocols import DEFAULT_PROTOCOL, PROTOCOLS

    assert choices.DATASETS == tuple(sorted(DATASETS))
    assert choices.DEGRADATIONS == tuple(DEGRADATIONS)
    assert choices.PROTOCOLS == tuple(PROTOCOLS)
    assert choices.DEFAULT_PROTOCOL == DEFAULT_PROTOCOL
    assert choices.EXPORT_FORMATS == tuple(FORMATS)
