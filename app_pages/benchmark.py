import streamlit as st

st.title("Benchmark")
st.info("Comparing precisions side by side (speed, memory, quality) comes here.")
