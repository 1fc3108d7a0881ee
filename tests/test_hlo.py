"""The HLO reader and the per-step communication accounting on a checked-in compiled program.

tests/golden/two_phase_scan.hlo is XLA:CPU's `compiled.as_text()` (jax 0.10.2, metadata and the
stack-frame tables removed) of a shard_map over 4 devices, each holding an f32[2,8] block x:
  before the loops  an all-gather of x (f32[4,2,8]) that seeds the second loop's carry;
  loop 1 (2 steps)  y = y * all_gather(y).sum(0): the step waits for its all-gather;
  loop 2 (3 steps)  y = y + halo + gathered.sum(0) from the carry, then a lax.cond whose true branch
                    adds psum(y), then halo = ppermute(y) over the ring and gathered = all_gather(y),
                    both only carried to the next step (DistriFusion's displaced exchanges).
Every expected name and number below was read off that text by hand. The loops nested in a step
(PipeFusion's micro-steps) are checked on small programs compiled here.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from sharding.accounting import comm, hlo
from sharding.axes import PATCH

GOLDEN = (Path(__file__).parent / "golden" / "two_phase_scan.hlo").read_text()
LOOP_1, LOOP_2 = "region_0.2_spmd", "region_3.9_spmd"


@pytest.fixture(scope="module")
def module():
  return hlo.parse(GOLDEN)


def test_computations_entry_and_instructions(module):
  assert module.entry == "main.12_spmd"
  assert len(module.computations) == 21  # the headers at the start of a line, ENTRY's included
  assert [i.name for i in module.computations["region_8.7"]] == ["psum_invariant.0", "psum_invariant.1",
                                                                "add.9"]
  gather = next(i for i in module.computations[LOOP_2] if i.name == "all_gather.19")
  assert (gather.opcode, gather.shape, gather.operands, gather.is_root) == (
      "all-gather", "f32[4,2,8]{2,1,0}", ["bitcast.1"], False)
  assert "dimensions={0}" in gather.attributes
  root = module.computations[LOOP_2][-1]
  assert (root.name, root.opcode, root.is_root) == ("tuple.32", "tuple", True)
  assert root.operands == ["wrapped_add.1", "get-tuple-element.66", "ppermute.3", "all_gather.19"]
  assert hlo.array_shapes(root.shape) == [("s32", ()), ("f32", (2, 8)), ("f32", (2, 8)), ("f32", (4, 2, 8))]


def test_called_computations_and_reachability(module):
  by_name = {i.name: i for i in module.computations[module.entry] + module.computations[LOOP_2]}
  assert by_name["while.22"].called() == ["region_2.3_spmd", LOOP_1]  # condition, body
  assert by_name["while.23"].called() == ["region_9.10_spmd", LOOP_2]
  assert by_name["conditional.clone"].called() == ["region_6.6_spmd", "region_7.8_spmd"]
  assert by_name["reduce_add_fusion"].called() == ["fused_computation.3"]
  assert by_name["ppermute.3"].called() == []
  assert set(module.reachable(LOOP_2)) == {
      LOOP_2, "fused_computation.3", "region_4.4", "wrapped_add_computation.1", "fused_computation.2",
      "region_5.5", "region_6.6_spmd", "fused_computation.1", "region_7.8_spmd", "region_8.7",
      "wrapped_add_computation.2"}
  assert module.reachable(LOOP_2)[0] == LOOP_2


def test_users(module):
  users = module.users(LOOP_2)
  assert [u.name for u in users["get-tuple-element.66"]] == ["ppermute.3", "bitcast.1", "tuple.32"]
  assert [u.name for u in users["ppermute.3"]] == ["tuple.32"]
  assert [u.name for u in users["tuple.23"]] == ["conditional.clone"] * 2  # both branches' operand
  assert "tuple.32" not in users  # the ROOT feeds the next iteration, no instruction here


def test_bytes():
  assert hlo.nbytes("f32", (4, 2, 8)) == 256 and hlo.nbytes("bf16", (3,)) == 6 and hlo.nbytes("pred", ()) == 1
  with pytest.raises(ValueError, match="unknown HLO element type 'f4'"):
    hlo.nbytes("f4", (2,))


def test_traffic_per_step():
  # An all-gather brings 3 of its 4 f32[2,8] blocks (3 × 64 = 192 B); the ring permute a whole block
  # (64 B); the all-reduce in the conditional's branch its f32[2,8] payload (64 B). The all-gather
  # before the loops is not per-step traffic.
  loop_1, loop_2 = comm.traffic_per_step(GOLDEN)
  assert loop_1.by_kind == {"all-gather": (1, 192)}
  assert loop_2.by_kind == {"all-gather": (1, 192), "collective-permute": (1, 64), "all-reduce": (1, 64)}
  assert (loop_1.total_bytes, loop_2.total_bytes) == (192, 320)


def test_consumed_in_step():
  # Loop 1 multiplies by its all-gather; in loop 2 the permute and the all-gather only reach the
  # ROOT tuple (carried), and the all-reduce inside a branch is counted as consumed (conservatively).
  assert comm.consumed_in_step(GOLDEN) == [["all_gather.17"], ["psum_invariant.6"]]
  # The reader must notice a use: the same program with the permuted halo added in the step.
  used = GOLDEN.replace(
      "  ROOT %tuple.32 = (s32[], f32[2,8]{1,0}, f32[2,8]{1,0}, f32[4,2,8]{2,1,0}) tuple(%wrapped_add.1, "
      "%get-tuple-element.66, %ppermute.3,",
      "  %used = f32[2,8]{1,0} add(%ppermute.3, %ppermute.3)\n"
      "  ROOT %tuple.32 = (s32[], f32[2,8]{1,0}, f32[2,8]{1,0}, f32[4,2,8]{2,1,0}) tuple(%wrapped_add.1, "
      "%get-tuple-element.66, %used,")
  assert used != GOLDEN
  assert comm.consumed_in_step(used) == [["all_gather.17"], ["ppermute.3", "psum_invariant.6"]]


def test_text_without_an_entry_is_refused():
  with pytest.raises(ValueError, match="no ENTRY computation"):
    hlo.parse(GOLDEN.replace("ENTRY %main", "%main"))


def _nested_scans(steps: int, micro_steps: int) -> str:
  """Compiled text of a shard_map over 4 devices (f32[2,8] each): `steps` steps, each a scan of
  `micro_steps` micro-steps that pass the block around the ring (a 64 B permute each)."""
  mesh = Mesh(np.array(jax.devices()[:4]), (PATCH,))
  ring = [(i, (i + 1) % 4) for i in range(4)]

  def step(y, _):
    micro = lambda z, _: (z + lax.ppermute(z, PATCH, ring), None)  # noqa: E731
    return lax.scan(micro, y, jnp.arange(micro_steps))[0] * 0.5, None

  program = jax.shard_map(lambda y: lax.scan(step, y, jnp.arange(steps))[0], mesh=mesh,
                          in_specs=PartitionSpec(PATCH), out_specs=PartitionSpec(PATCH))
  return jax.jit(program).lower(jnp.ones((8, 8))).compile().as_text()


def test_a_loop_nested_in_the_step_counts_once_per_iteration():
  (step,) = comm.traffic_per_step(_nested_scans(steps=3, micro_steps=5))
  assert step.by_kind == {"collective-permute": (5, 5 * 64)}
  assert comm.traffic_by_axis(_nested_scans(steps=3, micro_steps=5), {PATCH: 4}) == [{PATCH: 5 * 64}]


def test_a_one_step_scan_is_no_phase_even_when_its_inner_loop_is_left():
  # XLA inlines the scan of one step; its micro-step loop, now in the entry, is not a step loop
  text = _nested_scans(steps=1, micro_steps=5)
  assert sum(i.opcode == "while" for i in hlo.parse(text).computations[hlo.parse(text).entry]) == 1
  assert comm.traffic_per_step(text) == []


def test_a_nested_loop_without_a_known_trip_count_is_refused():
  text = _nested_scans(steps=3, micro_steps=5)
  inner = [line for line in text.splitlines() if " while(" in line and "while/body/" in line]
  assert len(inner) == 1
  unknown = text.replace(inner[0], inner[0].replace('"known_trip_count":{"n":"5"}', '"dynamic_variables":[]'))
  with pytest.raises(ValueError, match="no known_trip_count for this while loop"):
    comm.traffic_per_step(unknown)
