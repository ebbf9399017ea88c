"""Stage 7: `yqpack verify` - a tritonclient load test measuring served mAP, latency and throughput, with gates."""
