"""The fused CPU path (being built; see the CPU issue). Until then the 'cpu' backend reports itself
unavailable and "auto" falls back to PyTorch."""


def unavailable_reason() -> str | None:
    return "normlib's fused CPU path is not built yet"
