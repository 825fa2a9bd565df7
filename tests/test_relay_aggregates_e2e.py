"""relay-aggregates-url between two real collectors: A holds reports of the last days and
sends their aggregates to B, which is down at first (A retries) and then keeps and publishes
them; nothing but the k-anonymous cells reaches B: no address, host name or uuid."""

import sqlite3
import time
import uuid

import pytest
import requests

from tunnel_telemetry.store import open_store
from tunnel_telemetry.testing.server import free_port, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "aggregates-relay-token-0123456789"
DAY = 86400
ENDPOINT, HOST = "1.1.1.77", "secret-proxy.example.org"


def test_primary_sends_closed_days_to_a_secondary(tmp_path, tt_server):
    db = tmp_path / "a.db"
    store = open_store(f"sqlite:///{db}")
    uuids = []
    try:
        for day in (1, 2):
            for n in range(30):
                uid = str(uuid.uuid4())
                uuids.append(uid)
                store.add({"report-type": "tunnel-telemetry", "uuid": uid, "client_cc": "IR",
                           "client_asn": "AS58224", "proto": "ss", "endpoint_asn": "AS13335",
                           "endpoint_cc": "US", "endpoint": f"ss://{ENDPOINT}:443",
                           "endpoint_addr": HOST, "sampling_rate": 1,
                           "failure": {"op": "connect", "msg": f"refused by {ENDPOINT}"}
                           if n < 20 else None}, None)
                with sqlite3.connect(db) as conn:  # received on a closed day
                    conn.execute("UPDATE reports SET received = ? WHERE uuid = ?",
                                 ((time.time() // DAY - day) * DAY + 600, uid))
    finally:
        store.close()
    port = free_port()
    a = tt_server("--database-url", f"sqlite:///{db}", "--collector-id", "primary-1",
                  "--relay-aggregates-url", f"http://127.0.0.1:{port}", "--relay-token", TOKEN,
                  "--relay-interval", "0.2", "--relay-retry-min", "0.2", "--relay-retry-max",
                  "0.5", "--workers", "1", name="a")
    assert wait_for(lambda: "relay aggregates: pending (connection-error" in a.logs(), 20)
    b = tt_server("--database-url", f"sqlite:///{tmp_path}/b.db", "--relay-tokens", TOKEN,
                  port=port, name="b")

    def relayed():
        answer = requests.get(f"{b.url}/aggregates?source=primary-1", timeout=5).json()
        return answer["periods"] if len(answer["periods"]) == 7 else None

    periods = wait_for(relayed, 20)
    assert periods, b.logs()[-2000:]
    own = requests.get(f"{a.url}/aggregates", timeout=5).json()["periods"][-7:]
    assert periods == [{**p, "k": 10} for p in own]
    cells = [c for p in periods for c in p["cells"]]
    assert {(c["outcome"], c["count"]) for c in cells} == {("failure", 20), ("success", 10)}
    assert len(cells) == 4
    b.stop()
    assert "relay aggregates: delivered 7 days" in a.logs()
    kept = b"".join(path.read_bytes() for path in tmp_path.glob("b.db*"))
    kept += b.logs().encode() + a.logs().encode()
    for secret in (ENDPOINT, HOST, "ss://", "refused", *uuids, *(u[:8] for u in uuids)):
        assert secret.encode() not in kept, secret
