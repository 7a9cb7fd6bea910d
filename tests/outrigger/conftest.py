from tests.control_plane.conftest import plane

__all__ = ["plane"]
