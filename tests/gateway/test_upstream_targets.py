"""How `--verifier` and `--draft` become what the gateway dials: errors name the bad entry."""
import pytest

from gateway.main import draft_target
from gateway.verifier_pool import split_targets


def test_a_draft_name_balances_over_all_its_addresses_and_a_list_of_ips_over_each():
    assert draft_target("draft-headless:50052") == "dns:///draft-headless:50052"
    assert draft_target("127.0.0.1:50052") == "127.0.0.1:50052"
    assert draft_target("10.0.0.1:1, 10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    assert draft_target("[::1]:1,[::2]:1") == "ipv6:[::1]:1,[::2]:1"


@pytest.mark.parametrize("spec,message", [("draft:1,10.0.0.2:1", "IP:port entries"),
                                          ("10.0.0.1:1,[::1]:1", "mixes IPv4 and IPv6")])
def test_a_draft_list_that_grpc_cannot_balance_is_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        draft_target(spec)


def test_verifier_targets_are_host_port_entries():
    assert split_targets("verifier-headless:50053") == ["verifier-headless:50053"]
    with pytest.raises(ValueError, match="at least one"):
        split_targets(" , ")
