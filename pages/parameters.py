import streamlit as st

st.title("Parameters")
st.info("Generation settings (max new tokens, temperature, top-p, top-k, repetition penalty, seed, presets) come here.")
