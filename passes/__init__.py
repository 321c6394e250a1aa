"""FX passes over the graph Dynamo traces (installed as ``sdtm_compile.passes``)."""
