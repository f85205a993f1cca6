"""The Benchmark page through AppTest: a small matrix on the tiny ChatGLM2 fixture, stored and charted."""
import time

from streamlit.testing.v1 import AppTest

from conftest import FIXTURES, ROOT


def test_a_run_is_measured_in_the_background_stored_and_charted(store):
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=300)
    at.session_state["role"] = "operator"
    at.run()
    at.switch_page("app_pages/benchmark.py").run()
    assert not at.exception
    at.selectbox(key="bench-model").set_value("Local directory or .gguf file ...")
    at.text_input(key="bench-path").set_value(str(FIXTURES / "v2"))
    at.multiselect(key="bench-precisions").set_value(["fp32", "int4"])
    at.multiselect(key="bench-prompts").set_value([32])
    at.number_input(key="bench-new").set_value(4)
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]

    from app import runtime
    job = runtime.bench_jobs().job
    deadline = time.time() + 240
    while job.running and time.time() < deadline:
        time.sleep(1)
    assert not job.running and not job.error
    at.run()
    assert not at.exception

    run = store.list_bench_runs()[0]
    assert run["id"] == job.run_id and run["status"] == "done" and run["n_results"] == 2
    results = {r["precision"]: r for r in store.bench_results(run["id"])}
    assert results["fp32"]["decode_tok_s"] > 0 and results["int4"]["peak_rss_gb"] > 0
    assert results["int4"]["top1_agreement"] is not None and 0 <= results["int4"]["top1_agreement"] <= 1
    assert len(at.get("vega_lite_chart")) == 3
    assert any("int4** vs fp32" in m.value and "the fp32 speed" in m.value for m in at.markdown)
    table = at.dataframe[0].value
    assert list(table["precision"]) == ["fp32", "int4"] and "decode (tokens/s)" in table.columns
