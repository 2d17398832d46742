from owl_desktop.cli import main

raise SystemExit(main())
