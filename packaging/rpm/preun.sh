if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl --system --no-reload disable --now rmachined.service >/dev/null 2>&1 || :
fi
