"""Benchmark: what INT8 and INT4 cost and save on this machine, measured side by side and kept in SQLite.
Everyone sees the runs; only the operator starts or cancels one."""
import altair as alt
import pandas as pd
import psutil
import streamlit as st
import torch

from app import runtime
from app.access import loadable
from app.bench_jobs import BenchBusy
from app_pages.ui import error, is_operator, plain_text, store_or_stop
from glm_core import PRECISIONS
from glm_core.bench import PUBLISHED, RANDOM, BenchError, BenchSpec
from glm_core.registry import EMBEDDED, MODELS

CUSTOM = "Local directory or .gguf file ..."
UNITS = {"load_s": "load (s)", "weights_gb": "weights (GiB)", "peak_rss_gb": "peak RSS (GiB)",
         "vram_peak_gb": "peak VRAM (GiB)", "prefill_tok_s": "prefill (tokens/s)", "ttft_s": "first token (s)",
         "decode_tok_s": "decode (tokens/s)", "decode_fraction_of_limit": "decode / bandwidth limit",
         "top1_agreement": "top-1 agreement", "mean_kl": "mean KL (nats)", "perplexity": "perplexity"}

store = store_or_stop()
jobs = runtime.bench_jobs()
operator = is_operator()

st.title("Benchmark")
st.markdown(
    "Weight-only quantization stores each weight in 8 or 4 bits instead of 16 and widens it again as it is used. "
    "It always cuts the **memory** the model needs. It makes **decoding** faster only where reading the weights from "
    "memory is the limit (one token at a time, on most CPUs and GPUs); the prompt (prefill) is limited by arithmetic, "
    "where it can be slower. Quality drops a little, more at 4 bits: the runs below measure all three on this machine.")


@st.fragment(run_every=2)
def live() -> None:
    job = jobs.job
    if job is None:
        return
    if job.running:
        st.session_state.watching = job.run_id
        p = job.progress
        eta = f" · about {p['eta_s']:.0f} s left" if p.get("eta_s") else ""
        st.progress(min(p["done"] / max(p["total"], 1), 1.0),
                    text=f"Run #{job.run_id}: {p['label']} ({p['done']}/{p['total']}){eta}")
        st.caption(f"Each precision is measured while the model service is idle: replies being written finish "
                   f"first, new ones wait ({runtime.models().waiting} waiting now).")
        if operator and st.button("Cancel the run", icon=":material/cancel:"):
            jobs.cancel(operator)
    elif st.session_state.get("watching") == job.run_id:
        del st.session_state["watching"]
        st.rerun()   # the finished run shows below with its charts
    elif job.error:
        error(f"Run #{job.run_id} failed: {job.error}")


def new_run_form() -> None:
    job = jobs.job
    with st.form("new-run"):
        st.markdown("**New run**")
        options = [EMBEDDED] + [f"{RANDOM}{n}" for n in ("chatglm2-6b", "chatglm3-6b", "chatglm-6b")] + \
                  [n for n in MODELS if n != EMBEDDED] + [CUSTOM]
        left, right = st.columns(2)
        model = left.selectbox("Model", options, key="bench-model", help="random:… builds a model with random weights at the true size: "
                               "speed and memory are honest, quality cannot be measured.")
        custom = left.text_input("Path (for the last choice)", key="bench-path", placeholder="~/models/chatglm2-6b")
        precisions = right.multiselect("Precisions", PRECISIONS, key="bench-precisions", default=["fp32", "int8", "int4"])
        prompts = right.multiselect("Prompt lengths (tokens)", [32, 128, 512, 1024, 2048], key="bench-prompts", default=[32, 128])
        a, b, c = st.columns(3)
        new_tokens = a.number_input("New tokens", 2, 2048, 32, key="bench-new")
        repeats = b.number_input("Repetitions", 1, 10, 1, help="Speeds are the median over repetitions.")
        device = c.selectbox("Device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        started = st.form_submit_button("Run", type="primary", icon=":material/play_arrow:",
                                        disabled=job is not None and job.running)
    if not started:
        return
    name = custom.strip() if model == CUSTOM else model
    if not name or not precisions or not prompts:
        st.error("Choose a model, at least one precision and one prompt length.")
        return
    refused = loadable(name) if not name.startswith(RANDOM) else ""
    if refused:
        error(refused)
        return
    if name in MODELS and name != EMBEDDED:
        st.warning(f"{name} is fetched from the Hub: this only works where the Hub is reachable and the weights are "
                   f"cached. Without the weights, use random:{name.split('-int')[0]}.")
    spec = BenchSpec(model=name, precisions=precisions, prompt_tokens=sorted(prompts), new_tokens=int(new_tokens),
                     repeats=int(repeats), device=device)
    try:
        jobs.start(spec, operator)
    except (BenchError, BenchBusy) as e:
        error(str(e))
        return
    st.rerun()


def results_frame(run_ids: list[int], runs: dict[int, dict]) -> pd.DataFrame:
    rows = []
    for run_id in run_ids:
        for r in store.bench_results(run_id):
            rows.append({**r["result"], "run": f"#{run_id} {runs[run_id]['settings']['model']}"})
    return pd.DataFrame(rows)


def charts(df: pd.DataFrame) -> None:
    ok = df[df["error"].isna()] if "error" in df else df
    if ok.empty:
        st.warning("No measurement succeeded in this run: " + "; ".join(df["error"].dropna().unique()))
        return
    ok = ok.assign(prompt=ok["prompt_tokens"].astype(str) + " tokens")
    order = [p for p in PRECISIONS if p in set(ok["precision"])]
    speed = ok.melt(id_vars=["run", "precision", "prompt"], value_vars=["prefill_tok_s", "decode_tok_s"],
                    var_name="phase", value_name="tokens/s").replace({"prefill_tok_s": "prefill", "decode_tok_s": "decode"})
    st.markdown("**Tokens per second** by precision and prompt length")
    st.altair_chart(alt.Chart(speed).mark_bar().encode(
        x=alt.X("precision:N", sort=order, title=None), y=alt.Y("tokens/s:Q"), color=alt.Color("precision:N", sort=order),
        xOffset="prompt:N", column=alt.Column("phase:N", title=None), row=alt.Row("run:N", title=None),
        tooltip=["run", "precision", "prompt", "phase", alt.Tooltip("tokens/s:Q", format=".2f")]).properties(height=220))

    memory = ok.groupby(["run", "precision"], as_index=False)[["weights_gb", "peak_rss_gb"]].max().melt(
        id_vars=["run", "precision"], var_name="measure", value_name="GiB")
    memory["measure"] = memory["measure"].map({"weights_gb": "weights (measured)", "peak_rss_gb": "peak RSS (measured)"})
    published = [{"run": r, "precision": p, "measure": "published: GPU memory to encode 2048 tokens", "GiB": v * 1e9 / 2**30}
                 for r in ok["run"].unique() if "chatglm2-6b" in r
                 for p, v in PUBLISHED["chatglm2-6b"][0]["values"].items() if p in order]
    memory = pd.concat([memory, pd.DataFrame(published)], ignore_index=True)
    st.markdown("**Memory** by precision (published reference figures are labelled as such)")
    st.altair_chart(alt.Chart(memory).mark_bar().encode(
        x=alt.X("precision:N", sort=order, title=None), y="GiB:Q", color="measure:N", xOffset="measure:N",
        row=alt.Row("run:N", title=None), tooltip=["run", "precision", "measure", alt.Tooltip("GiB:Q", format=".2f")]
    ).properties(height=220))

    quality = ok.dropna(subset=["top1_agreement"]).groupby(["run", "precision"], as_index=False)[
        ["top1_agreement", "mean_kl", "perplexity"]].first()
    st.markdown("**Quality** against the highest precision of the run, on the bundled text")
    if quality.empty:
        st.info(", ".join(ok["quality_note"].dropna().unique()) or "Quality was not measured in this run.")
    else:
        st.altair_chart(alt.Chart(quality).mark_bar().encode(
            x=alt.X("precision:N", sort=order, title=None), y=alt.Y("top1_agreement:Q", title="top-1 agreement",
                                                                     scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("precision:N", sort=order), column=alt.Column("run:N", title=None),
            tooltip=["precision", alt.Tooltip("top1_agreement:Q", format=".3f"), alt.Tooltip("mean_kl:Q", format=".4f"),
                     alt.Tooltip("perplexity:Q", format=".2f")]).properties(height=200, width=260))


def verdict(df: pd.DataFrame) -> None:
    """What quantization did in this run, in words, from the measured figures."""
    ok = df[df["error"].isna()] if "error" in df else df
    if ok.empty:
        return
    base = next((p for p in ("fp32", "bf16", "fp16") if p in set(ok["precision"])), None)
    if base is None:
        return
    by = ok.groupby("precision")[["weights_gb", "decode_tok_s", "prefill_tok_s"]].median()
    for p in ("int8", "int4"):
        if p in by.index:
            mem = by.loc[base, "weights_gb"] / by.loc[p, "weights_gb"]
            dec = by.loc[p, "decode_tok_s"] / by.loc[base, "decode_tok_s"]
            pre = by.loc[p, "prefill_tok_s"] / by.loc[base, "prefill_tok_s"]
            st.markdown(f"- **{p}** vs {base}: weights {mem:.1f}x smaller; decoding at {dec:.2f}x "
                        f"and prefill at {pre:.2f}x the {base} speed.")


live()
if operator:
    new_run_form()
else:
    st.caption("The operator (whoever started the server) runs benchmarks; here are the runs so far.")

runs = {r["id"]: r for r in store.list_bench_runs()}
st.subheader("Runs")
if not runs:
    st.caption("No run yet. A short run of the embedded model takes a minute or two.")
    st.stop()
labels = {i: f"#{i} · {plain_text(r['settings']['model'])} · {', '.join(r['settings']['precisions'])} · {r['status']} · {r['created_at'][:16]}"
          for i, r in runs.items()}
chosen = st.multiselect("Compare runs", list(runs), default=[next(iter(runs))], format_func=labels.get)
if not chosen:
    st.stop()
df = results_frame(chosen, runs)
if df.empty:
    st.caption("These runs have no results yet.")
    st.stop()
verdict(df)
charts(df)
columns = ["run", "precision", "prompt_tokens", "new_tokens"] + [c for c in UNITS if c in df]
st.dataframe(df[columns].rename(columns={**UNITS, "prompt_tokens": "prompt (tokens)", "new_tokens": "new (tokens)"}),
             hide_index=True, width="stretch")
machine = runs[chosen[0]]["machine"]
st.caption(f"Machine of run #{chosen[0]}: {machine.get('cpu')} · {machine.get('cores')} cores · {machine.get('ram_gb')} GB RAM · "
           f"GPU {machine.get('gpu') or 'none'} · torch {machine.get('torch')} · now {psutil.cpu_count()} cores here")
st.download_button("Export as CSV", df.drop(columns=["machine"], errors="ignore").to_csv(index=False),
                   file_name="glm-studio-benchmark.csv", mime="text/csv", icon=":material/download:")
with st.expander("Published reference figures"):
    for ref in PUBLISHED["chatglm2-6b"]:
        st.markdown(f"- **{ref['what']}** ({ref['unit']}): " + ", ".join(f"{p} {v}" for p, v in ref["values"].items())
                    + f" — {ref['source']}; {ref['conditions']}")
