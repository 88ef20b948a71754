from rlm_mcp.cli import main

main()
