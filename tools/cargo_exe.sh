# Sourced by tools/build_gpu_bundle.sh and build_gpu_baseline.sh: `cargo ... --no-run
# --message-format=json | exe NAME` prints the path of target NAME's built executable.
exe() { python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -n 1; }
