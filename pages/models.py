import streamlit as st

st.title("Models")
st.info("Choosing the model, its precision (FP16/BF16, INT8, INT4) and device comes here.")
