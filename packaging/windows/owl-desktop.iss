; Inno Setup 6 script for the Windows installer of owl-desktop. NOT BUILT OR TESTED on our Linux machines:
; packaging/windows/build-installer.ps1 builds the PyInstaller folder, then runs
;   iscc /DAppVersion=0.1.0 /DSourceDir=..\..\build\dist\owl-desktop packaging\windows\owl-desktop.iss
; The installer copies the one-folder bundle to Program Files (or the user's programs folder for a per-user install),
; adds a Start menu entry and "Open with Owl" for images. Models and conversations live in
; %LOCALAPPDATA%\owl-desktop (platformdirs), which the installer never creates, so upgrades and uninstall keep them.

#ifndef AppVersion
  #error Pass /DAppVersion=X.Y.Z
#endif
#ifndef SourceDir
  #define SourceDir "..\..\build\dist\owl-desktop"
#endif

[Setup]
; Never change AppId: it is how upgrades find the installed copy.
AppId={{6B7E3C2A-4F1D-4E8B-9A57-0D2C1E9F8A41}
AppName=Owl
AppVersion={#AppVersion}
AppVerName=Owl {#AppVersion}
AppPublisher=The owl-desktop developers
AppPublisherURL=https://owldesktop.github.io/
DefaultDirName={autopf}\Owl
DefaultGroupName=Owl
DisableProgramGroupPage=yes
; Per-user install without admin rights is offered too.
PrivilegesRequired=admin
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
MinVersion=10.0.17763
OutputDir=..\..\build
OutputBaseFilename=Owl-{#AppVersion}-windows-x64-setup
SetupIconFile=..\..\build\owl-desktop.ico
UninstallDisplayIcon={app}\owl-desktop.exe
; ~900 MB of torch and Qt: LZMA2 in solid mode gives the smallest download.
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern
ChangesAssociations=yes
; Sign the installer and uninstaller: define the "signtool" tool in the IDE or pass
;   /Ssigntool="signtool.exe sign /fd sha256 /tr http://timestamp.digicert.com /td sha256 /a $f"
; on the iscc command line, then uncomment:
; SignTool=signtool

[Files]
; The whole PyInstaller folder; [InstallDelete] below clears the previous version's files first, so that an upgrade
; never mixes two torch builds.
Source: "{#SourceDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[InstallDelete]
Type: filesandordirs; Name: "{app}\_internal"

[Icons]
Name: "{autoprograms}\Owl"; Filename: "{app}\owl-desktop.exe"
Name: "{autodesktop}\Owl"; Filename: "{app}\owl-desktop.exe"; Tasks: desktopicon

[Tasks]
Name: desktopicon; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[Registry]
; "Open with > Owl" for images, without taking the default handler away from the user's viewer.
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe"; ValueType: string; ValueName: "FriendlyAppName"; ValueData: "Owl"; Flags: uninsdeletekey
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\shell\open\command"; ValueType: string; ValueData: """{app}\owl-desktop.exe"" ""%1"""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".png"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".jpg"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".jpeg"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".webp"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".gif"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".bmp"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".tif"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\Applications\owl-desktop.exe\SupportedTypes"; ValueType: string; ValueName: ".tiff"; ValueData: ""
Root: HKA; Subkey: "Software\Classes\.png\OpenWithProgids"; ValueType: string; ValueName: "Applications\owl-desktop.exe"; ValueData: ""; Flags: uninsdeletevalue
Root: HKA; Subkey: "Software\Classes\.jpg\OpenWithProgids"; ValueType: string; ValueName: "Applications\owl-desktop.exe"; ValueData: ""; Flags: uninsdeletevalue
Root: HKA; Subkey: "Software\Classes\.jpeg\OpenWithProgids"; ValueType: string; ValueName: "Applications\owl-desktop.exe"; ValueData: ""; Flags: uninsdeletevalue
Root: HKA; Subkey: "Software\Classes\.webp\OpenWithProgids"; ValueType: string; ValueName: "Applications\owl-desktop.exe"; ValueData: ""; Flags: uninsdeletevalue

[Run]
Filename: "{app}\owl-desktop.exe"; Description: "{cm:LaunchProgram,Owl}"; Flags: nowait postinstall skipifsilent

[UninstallDelete]
; Only what the installer put there. %LOCALAPPDATA%\owl-desktop (models, conversations) is the user's and stays.
Type: filesandordirs; Name: "{app}\_internal"
