from twopass import dirty_memory  # noqa: F401 -- the fixture, for the two-pass backends' tests
