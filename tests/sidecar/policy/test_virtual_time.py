import asyncio

from tests.sidecar.policy.fakes import VirtualTimeLoop


async def test_policy_tests_run_on_a_loop_with_virtual_time() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    start = loop.time()
    await asyncio.sleep(3600)
    assert loop.time() - start >= 3600
