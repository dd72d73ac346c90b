if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null 2>&1 || :
	# An upgrade restarts the daemon; running machines keep running and the
	# new daemon re-adopts them.
	if [ "$1" -ge 1 ]; then
		systemctl --system try-restart rmachined.service >/dev/null 2>&1 || :
	fi
fi
if [ "$1" -eq 0 ]; then
	rm -rf /run/rmachines
fi
