# Sourced by bench scripts. `moontide serve` is a supervisor process that runs the node as
# its child (ARCHITECTURE.md, "Isolation"); CPU, memory and profiles are the child's.
#
#   node_process PID     the node process under supervisor PID (PID itself if it has none)
node_process() {
    local kid _
    for _ in $(seq 50); do
        kid=$(ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' | head -1)
        if [ -n "$kid" ]; then echo "$kid"; return; fi
        sleep 0.1
    done
    echo "$1"
}
