"""Analysis: calibration data, streaming statistics, and layer/scale-group discovery."""
