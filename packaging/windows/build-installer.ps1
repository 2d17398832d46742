# Build the Windows installer of owl-desktop. NOT BUILT OR TESTED on our Linux machines: this is the recipe, run in
# PowerShell on Windows 10/11 x64 with Python 3.11, Visual Studio 2022 Build Tools (C++ workload), CMake,
# Inno Setup 6 (iscc on PATH) and, for a signed release, signtool from the Windows SDK.
#
#   .\packaging\windows\build-installer.ps1                     # CPU build
#   .\packaging\windows\build-installer.ps1 -Cuda               # CUDA torch + llama.cpp (needs the CUDA Toolkit)
#   $env:OWL_SIGN_CERT_SHA1 = "<thumbprint>"; .\packaging\windows\build-installer.ps1
param([switch]$Cuda)
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..\..")
$Version = (Select-String -Path owl_desktop\__init__.py -Pattern '^__version__ = "(.*)"$').Matches[0].Groups[1].Value
$Venv = "build\pkg-venv-win"

# 1. Build venv. On Windows PyPI's torch wheel is the CPU build; the CUDA build comes from PyTorch's own index.
if (-not (Test-Path "$Venv\Scripts\python.exe")) { py -3.11 -m venv $Venv }
$Py = "$Venv\Scripts\python.exe"
if ($Cuda) {
    & $Py -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
    $env:CMAKE_ARGS = "-DGGML_CUDA=on -DGGML_NATIVE=OFF"
} else {
    & $Py -m pip install torch==2.13.0
    # The same portable x86-64-v3 baseline as packaging/install-llama-cpp: never -march=native.
    $env:CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
}
& $Py -m pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
& $Py -m pip install -r packaging\requirements-build.txt .

# 2. The one-folder bundle: owl-desktop.exe (the window, no console) and owl-desktop-cli.exe (terminal commands).
& "$Venv\Scripts\pyinstaller.exe" --noconfirm --clean --distpath build\dist --workpath build\pyinstaller `
    packaging\pyinstaller\owl-desktop.spec
& build\dist\owl-desktop\owl-desktop-cli.exe --version
& build\dist\owl-desktop\owl-desktop-cli.exe --self-test --screenshot build\self-test-windows.png
if ($LASTEXITCODE -ne 0) { throw "self-test failed" }

# The installer's icon, from the rendered PNGs (Pillow writes every size into one .ico).
& $Py -c "from PIL import Image; Image.open('resources/app-icon/png/256.png').save('build/owl-desktop.ico', sizes=[(s, s) for s in (16, 24, 32, 48, 64, 128, 256)])"

# 3. Sign the executables before they go into the installer (SmartScreen and antivirus trust signed binaries).
$Timestamp = "http://timestamp.digicert.com"
if ($env:OWL_SIGN_CERT_SHA1) {
    Get-ChildItem build\dist\owl-desktop -Filter *.exe | ForEach-Object {
        signtool sign /sha1 $env:OWL_SIGN_CERT_SHA1 /fd sha256 /tr $Timestamp /td sha256 $_.FullName
    }
}

# 4. The installer.
iscc /DAppVersion=$Version /DSourceDir=..\..\build\dist\owl-desktop packaging\windows\owl-desktop.iss
$Setup = "build\Owl-$Version-windows-x64-setup.exe"
if ($env:OWL_SIGN_CERT_SHA1) {
    signtool sign /sha1 $env:OWL_SIGN_CERT_SHA1 /fd sha256 /tr $Timestamp /td sha256 $Setup
    signtool verify /pa $Setup
}
Write-Output $Setup
