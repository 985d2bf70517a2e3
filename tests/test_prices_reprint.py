"""`reprint-labels` really reprints: labels already printed or pushed at the active version reach the fake ZPL
printer and the fake ESL tags again, as jobs of their own (a real `storelink run`, the status page's action)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Mosquitto, Subscriber, wait_for
from tests.test_prices_atomic import MACS, Rig

TOKEN = "r" * 24


def test_reprint_of_labels_already_printed_and_pushed(tmp_path: Path, mosquitto: Mosquitto,
                                                      subscriber: Subscriber) -> None:
    rig = Rig(tmp_path, mosquitto)
    rig.config.write_text(rig.config.read_text().replace("[http]\n", f'[http]\ntoken = "{TOKEN}"\n'))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        rig.start_on_version_1(subscriber, 10, 400)
        assert rig.gw is not None
        sku, mac = "SKU000003", MACS["SKU000003"]

        def printed(s: str) -> int:
            return sum(1 for f in rig.floor.printed_labels() if f and f[-1] == f"{s}  v1")

        tag = rig.floor.ap.tags[mac]
        before_paper, before_tag = printed(sku), tag.updates
        assert before_paper == 1 and before_tag == 1
        code, body = rig.gw.post("/api/v1/actions/reprint-labels", {"args": {"skus": [sku]}}, headers=auth)
        assert code == 200, body
        assert body["result"]["devices"] == {"zpl": "queued 1", "esl": "queued 1"}
        assert body["result"]["version"] == 1 and body["result"]["items"] == 1
        wait_for(lambda: printed(sku) == 2, 15, what="the printed label printed again")
        wait_for(lambda: tag.updates == 2 and tag.pending == 0, 15, what="the tag took its content again")
        assert rig.floor.tag_price(sku) == 400 and rig.floor.paper(sku) == (400, 1)

        # the same reprint again is a job again (not ignored because the label was printed before)
        code, body = rig.gw.post("/api/v1/actions/reprint-labels", {"args": {"skus": [sku]}}, headers=auth)
        assert code == 200 and body["result"]["devices"]["zpl"] == "queued 1", body
        wait_for(lambda: printed(sku) == 3, 15, what="printed a third time")

        # all: every label of the book (10 on paper, 6 tags)
        code, body = rig.gw.post("/api/v1/actions/reprint-labels", {"args": {"all": True}}, headers=auth)
        assert code == 200 and body["result"]["devices"] == {"zpl": "queued 10", "esl": "queued 6"}, body
        wait_for(lambda: all(printed(f"SKU{i:06d}") >= 2 for i in range(10)), 20, what="every label reprinted")
        wait_for(lambda: all(rig.floor.ap.tags[m].updates >= 2 for m in MACS.values()), 20, what="every tag")
        # nothing about the prices changed
        assert rig.floor.lookup("1", sku)["price"] == 400  # type: ignore[index]
        assert rig.gw.get("/api/v1/prices/state")[1]["active_version"] == 1
    finally:
        rig.close()
