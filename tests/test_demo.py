"""`qftbench demo`: every registered method learns the toy task (or, for the un-tuned base, does not)."""
from qftbench import demo


def test_demo_every_method_learns_and_merges():
    rows = {r["method"]: r for r in demo.run(steps=40, log=lambda *a: None)}
    assert set(rows) >= {"lora", "qlora", "qalora", "loftq", "qbara", "qahira", "qahira-ref", "peqa", "base"}
    assert rows["base"]["trainable"] == 0 and rows["base"]["acc_after"] < 0.1
    for name, r in rows.items():
        if name != "base":
            assert r["acc_after"] > 0.2 > r["acc_before"], (name, r)
        assert r["acc_merged"] == r["acc_after"] and r["max_dlogit_merge"] < 1e-4, (name, r)
    print(demo.format_table(list(rows.values())))
