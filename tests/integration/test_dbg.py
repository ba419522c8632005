import time
from test_operator import *  # noqa

def test_debug(cluster):
    ns = "suspend"
    running(cluster, ns)
    cluster.edit_spec(ns, "demo", {"suspend": True})
    wait_for("phase Suspended", lambda: cluster.run(ns)["status"]["phase"] == "Suspended")
    time.sleep(2)
    mark = cluster.emulator.request_count()
    time.sleep(4)
    for r in list(cluster.emulator.handler)[mark:]:
        if r.method.value != "GET":
            print(r.method.value, r.url.path, r.headers.get("User-Agent"), r.body[:600])
    print(json.dumps(cluster.run(ns)["metadata"], indent=1))
    assert False
