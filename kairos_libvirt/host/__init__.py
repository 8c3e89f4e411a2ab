"""The OS boundary: syscalls, cgroup files and /proc.  Nothing else touches the kernel."""
