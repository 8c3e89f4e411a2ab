"""The testbed's function_graph parser (scripts/testbed.d/trapgraph.py): per-function times."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                                "scripts", "testbed.d"))

import trapgraph  # noqa: E402

# What Linux 6.1's function_graph prints with funcgraph-tail (two traps on two CPUs,
# interleaved headers and a duration marker '+' past 10 us).
TRACE = """\
# tracer: function_graph
#
# CPU  DURATION                  FUNCTION CALLS
# |     |   |                     |   |   |   |
 1)               |  kairos_ud_handle_ud [kvm]() {
 1)               |    kairos_trap [kvm]() {
 1)   1.200 us    |      kvm_read_guest_virt [kvm]();
 1)               |      kairos_record [kvm]() {
 1)   3.000 us    |        kairos_fetch.isra.0 [kvm]();
 1)   0.900 us    |        eventfd_signal();
 1)   6.000 us    |      } /* kairos_record [kvm] */
 1)   9.000 us    |    } /* kairos_trap [kvm] */
 1) + 10.50 us    |  } /* kairos_ud_handle_ud [kvm] */
 0)               |  kairos_ud_handle_ud [kvm]() {
 0)               |    kairos_trap [kvm]() {
 0)   1.000 us    |      kvm_read_guest_virt [kvm]();
 0)               |      kairos_record [kvm]() {
 0)   5.000 us    |        kairos_fetch.isra.0 [kvm]();
 0)   1.100 us    |        eventfd_signal();
 0)   8.000 us    |      } /* kairos_record [kvm] */
 0) + 11.00 us    |    } /* kairos_trap [kvm] */
 0) + 12.50 us    |  } /* kairos_ud_handle_ud [kvm] */
"""


def test_every_function_below_the_root_gets_its_calls_and_times():
    f = trapgraph.parse(TRACE)
    assert set(f) == {"kairos_ud_handle_ud", "kairos_trap", "kvm_read_guest_virt",
                      "kairos_record", "kairos_fetch", "eventfd_signal"}
    assert f["kairos_ud_handle_ud"] == {"calls": 2, "median_us": 11.5, "mean_us": 11.5}
    assert f["kairos_fetch"]["calls"] == 2 and f["kairos_fetch"]["mean_us"] == 4.0
    assert f["kairos_record"]["median_us"] == 7.0


def test_headers_and_opening_lines_are_not_durations():
    assert trapgraph.parse("# tracer: function_graph\n 1)   |  kairos_trap [kvm]() {\n") == {}
