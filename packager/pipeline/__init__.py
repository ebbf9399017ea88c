"""`yqpack build`: the stages chained (export -> calibration -> quantize -> manifest -> gate -> render), its options
and result, its configuration files and the manifest it writes."""
